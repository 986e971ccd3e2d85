//! A whole lab run: topology, served root, server, VMs, timelines, report.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::netns::{output_with_timeout, Lab, Proto, SERVER_ADDR, SERVER_IF};
use crate::payload::Part;
use crate::vm::{self, Firmware, VmOutcome, VmSpec};

/// How the VMs boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The server hands out addresses; iPXE fetches script, kernel and initrd over HTTP.
    Http,
    /// Same over TFTP.
    Tftp,
    /// Another DHCP server (dnsmasq, in its own namespace at 10.77.0.2) hands out addresses;
    /// the server under test answers as ProxyDHCP; files over HTTP.
    Proxy,
}

impl FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "http" => Ok(Mode::Http),
            "tftp" => Ok(Mode::Tftp),
            "proxy" => Ok(Mode::Proxy),
            _ => bail!("unknown lab mode {s:?} (http, tftp, proxy)"),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Http => "http",
            Mode::Tftp => "tftp",
            Mode::Proxy => "proxy",
        })
    }
}

/// The first boot file the firmware gets for the lab's Linux plan, which then loads the
/// kernel and initrd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    /// iPXE: QEMU's ROM on BIOS; Debian's `snponly.efi` (on the firmware's network stack)
    /// on UEFI.
    Ipxe,
    /// Debian's `ipxe.efi` (iPXE's own NIC drivers) on UEFI.
    IpxeFull,
    /// GRUB: the i386-pc network image on BIOS, Debian's signed network image on UEFI
    /// (behind shim under Secure Boot), the arm64 one on arm64.
    Grub,
    /// `lpxelinux.0` (BIOS only).
    Pxelinux,
}

impl Loader {
    pub fn name(&self) -> &'static str {
        match self {
            Loader::Ipxe => "ipxe",
            Loader::IpxeFull => "ipxe-full",
            Loader::Grub => "grub",
            Loader::Pxelinux => "pxelinux",
        }
    }

    /// What the firmware runs unless told otherwise.
    pub fn default_for(firmware: Firmware) -> Loader {
        match firmware {
            Firmware::Bios | Firmware::Uefi | Firmware::UefiHttp => Loader::Ipxe,
            Firmware::SecureBoot | Firmware::Arm64 => Loader::Grub,
        }
    }

    /// Whether this loader runs on `firmware` in the lab.
    pub fn runs_on(&self, firmware: Firmware) -> bool {
        match (self, firmware) {
            (Loader::Ipxe, Firmware::SecureBoot | Firmware::Arm64) => false,
            (Loader::IpxeFull, f) => matches!(f, Firmware::Uefi | Firmware::UefiHttp),
            (Loader::Grub, Firmware::UefiHttp) => false,
            (Loader::Pxelinux, f) => f == Firmware::Bios,
            _ => true,
        }
    }
}

impl FromStr for Loader {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Loader> {
        [Loader::Ipxe, Loader::IpxeFull, Loader::Grub, Loader::Pxelinux]
            .into_iter()
            .find(|l| l.name() == s)
            .with_context(|| format!("unknown loader {s:?} (ipxe, ipxe-full, grub, pxelinux)"))
    }
}

impl fmt::Display for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which server boots the VMs.
#[derive(Clone, Debug)]
pub enum ServerKind {
    /// `EXE serve --config FILE` (and `EXE trace MAC --config FILE --json` for timelines).
    Fleetboot { exe: PathBuf },
    /// dnsmasq (+ `python3 -m http.server` for HTTP) configured like the reference script.
    DnsmasqReference,
}

impl ServerKind {
    pub fn name(&self) -> &'static str {
        match self {
            ServerKind::Fleetboot { .. } => "fleetboot",
            ServerKind::DnsmasqReference => "dnsmasq",
        }
    }
}

/// What [`run`] does.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of VMs booted at once (1..=3).
    pub vms: usize,
    pub mode: Mode,
    pub server: ServerKind,
    /// Keep the work directory and the (emptied) namespaces for inspection.
    pub keep: bool,
    /// Work directory (logs, config, served root); default a fresh `/tmp/fleetboot-lab.*`,
    /// removed after a successful run unless `keep`.
    pub work_dir: Option<PathBuf>,
    /// What the VMs boot with (default: BIOS with QEMU's iPXE ROM).
    pub firmware: Firmware,
    /// The first boot file; `None`: [`Loader::default_for`] the firmware.
    pub loader: Option<Loader>,
    /// Secure Boot only: hand the firmware Debian's unsigned iPXE instead of shim. The run
    /// succeeds when every VM's firmware refuses it (`Access Denied`), proving that Secure
    /// Boot is enforced.
    pub refuse_unsigned: bool,
    /// Per-VM time limit (UEFI under TCG is slower than BIOS; arm64 much slower).
    pub vm_timeout: Option<Duration>,
}

impl LabOptions {
    pub fn new(vms: usize, mode: Mode, server: ServerKind) -> LabOptions {
        LabOptions {
            vms,
            mode,
            server,
            keep: false,
            work_dir: None,
            firmware: Firmware::Bios,
            loader: None,
            refuse_unsigned: false,
            vm_timeout: None,
        }
    }

    /// The loader in effect.
    pub fn loader(&self) -> Loader {
        self.loader.unwrap_or_else(|| Loader::default_for(self.firmware))
    }
}

/// The console line a UEFI firmware prints when Secure Boot refuses a boot file.
pub const SECURE_BOOT_REFUSAL: &str = "Access Denied";

/// Where a timeline entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineSource {
    /// `fleetboot trace` (server-side events).
    Server,
    /// The VM's serial console.
    Console,
}

/// One event in a VM's timeline.
#[derive(Clone, Debug)]
pub struct TimelineEntry {
    /// Seconds since the VM's QEMU started (may be slightly negative for clock skew).
    pub at: f64,
    pub source: TimelineSource,
    pub kind: String,
    pub detail: String,
}

/// One VM's result.
#[derive(Clone, Debug)]
pub struct VmReport {
    pub index: usize,
    pub mac: String,
    pub outcome: VmOutcome,
    pub console_log: PathBuf,
    pub timeline: Vec<TimelineEntry>,
    /// Why server-side events are missing from the timeline, if they are.
    pub trace_error: Option<String>,
}

/// The result of [`run`].
#[derive(Clone, Debug)]
pub struct LabReport {
    pub mode: Mode,
    pub firmware: Firmware,
    pub loader: Loader,
    /// Every VM was expected to be refused ([`LabOptions::refuse_unsigned`]).
    pub expect_refusal: bool,
    /// "fleetboot" or "dnsmasq".
    pub server: &'static str,
    pub nonce: String,
    pub vms: Vec<VmReport>,
    /// Wall time of the whole run (topology to cleanup).
    pub total: Duration,
    pub work_dir: PathBuf,
    /// Whether `work_dir` still exists after the run.
    pub work_dir_kept: bool,
}

impl LabReport {
    /// True when every VM printed its marker (the only pass criterion), or, in a run that
    /// expects a refusal, when every VM's firmware refused its boot file.
    pub fn success(&self) -> bool {
        !self.vms.is_empty()
            && self.vms.iter().all(|v| match self.expect_refusal {
                false => v.outcome.is_ok(),
                true => matches!(v.outcome, VmOutcome::Expected { .. }),
            })
    }

    /// Times to the marker of the VMs that printed it.
    pub fn marker_times(&self) -> Vec<Duration> {
        self.vms
            .iter()
            .filter_map(|v| v.outcome.marker_time())
            .collect()
    }
}

impl fmt::Display for LabReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for v in &self.vms {
            writeln!(f, "vm{} {}: {}", v.index, v.mac, v.outcome)?;
        }
        write!(
            f,
            "server={} firmware={} loader={} mode={} vms={} total_wall={:.2}s failures={} logs={}{}",
            self.server,
            self.firmware,
            self.loader,
            self.mode,
            self.vms.len(),
            self.total.as_secs_f64(),
            self.vms
                .iter()
                .filter(|v| match self.expect_refusal {
                    false => !v.outcome.is_ok(),
                    true => !matches!(v.outcome, VmOutcome::Expected { .. }),
                })
                .count(),
            self.work_dir.display(),
            if self.work_dir_kept { "" } else { " (removed)" }
        )
    }
}

/// One server-side event from `fleetboot trace MAC --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct TraceEvent {
    pub ts_ms: i64,
    #[serde(default)]
    pub mac: String,
    pub kind: String,
    #[serde(default)]
    pub detail: Option<String>,
}

/// The address-only DHCP server of [`Mode::Proxy`] (its own namespace, like a router).
const PROXY_DHCP_ADDR: &str = "10.77.0.2/24";
const SERVER_TIMEOUT_SECS: u64 = 1200;
const PY_HTTP_PORT: u16 = 8000;
const FB_HTTP_PORT: u16 = 8080;

fn random_nonce() -> String {
    let mut b = [0u8; 6];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        b.copy_from_slice(&(t.as_nanos() as u64 ^ std::process::id() as u64).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn make_work_dir(opts: &LabOptions) -> Result<(PathBuf, bool)> {
    let (dir, temp) = match &opts.work_dir {
        Some(d) => (d.clone(), false),
        None => {
            static N: AtomicU32 = AtomicU32::new(0);
            let d = std::env::temp_dir().join(format!(
                "fleetboot-lab.{}.{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&d);
            (d, true)
        }
    };
    fs::create_dir_all(dir.join("root")).with_context(|| format!("creating {}", dir.display()))?;
    // dnsmasq drops to nobody: the served root must be world-readable
    set_mode(&dir, 0o755)?;
    set_mode(&dir.join("root"), 0o755)?;
    Ok((dir, temp))
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

fn log_tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs the lab once; see the crate documentation. The caller should exit 0 only if
/// [`LabReport::success`]. Prints each VM's timeline and a summary to stdout.
pub fn run(opts: LabOptions) -> Result<LabReport> {
    ensure!(
        (1..=3).contains(&opts.vms),
        "vms must be 1..=3 (2 cores; got {})",
        opts.vms
    );
    let loader = opts.loader();
    ensure!(
        loader.runs_on(opts.firmware),
        "loader {loader} does not run on firmware {} in the lab",
        opts.firmware
    );
    ensure!(
        !opts.refuse_unsigned || opts.firmware == Firmware::SecureBoot,
        "refusing an unsigned boot file needs firmware secureboot"
    );
    let mut tools = vec!["ip", "ss", "timeout", opts.firmware.qemu()];
    if matches!(opts.server, ServerKind::DnsmasqReference) || opts.mode == Mode::Proxy {
        tools.push("dnsmasq");
    }
    if matches!(opts.server, ServerKind::DnsmasqReference) && opts.mode != Mode::Tftp {
        tools.push("python3");
    }
    for t in tools {
        ensure!(
            have(t),
            "{t} is not installed (run scripts/setup.sh as root)"
        );
    }
    if let ServerKind::Fleetboot { exe } = &opts.server {
        ensure!(
            exe.is_file(),
            "fleetboot executable {} not found",
            exe.display()
        );
    }
    if let Some((code, vars)) = opts.firmware.flash() {
        for f in [code, vars] {
            ensure!(Path::new(f).is_file(), "{f} is missing (run scripts/setup.sh as root)");
        }
    }
    let (work, temp) = make_work_dir(&opts)?;
    let root = work.join("root");
    fill_root(&root, opts.firmware, loader, opts.refuse_unsigned)?;
    let nonce = random_nonce();
    let t0 = Instant::now();

    let mut lab = Lab::new()?;
    lab.set_keep(opts.keep);
    let mut taps = Vec::new();
    for _ in 0..opts.vms {
        taps.push(lab.add_tap()?);
    }

    let boot = BootSetup { firmware: opts.firmware, loader, refuse_unsigned: opts.refuse_unsigned, vms: opts.vms };
    let config = match &opts.server {
        ServerKind::Fleetboot { exe } => Some(start_fleetboot(
            &mut lab, exe, &work, &root, &nonce, opts.mode, &boot,
        )?),
        ServerKind::DnsmasqReference => {
            start_reference(&mut lab, &work, &root, &nonce, opts.mode, &boot)?;
            None
        }
    };
    println!(
        "fleetboot-lab: {} {} firmware={} loader={} vms={} nonce={} namespaces={}-* work={}",
        opts.server.name(),
        opts.mode,
        opts.firmware,
        loader,
        opts.vms,
        nonce,
        lab.id(),
        work.display()
    );

    let specs: Vec<VmSpec> = taps
        .iter()
        .enumerate()
        .map(|(i, tap)| {
            let mut spec = VmSpec::new(i, tap, &nonce, &work);
            spec.firmware = opts.firmware;
            spec.timeout = opts.vm_timeout.unwrap_or_else(|| default_vm_timeout(opts.firmware));
            if opts.refuse_unsigned {
                spec.expect_instead.push(SECURE_BOOT_REFUSAL.to_string());
            }
            spec
        })
        .collect();
    let runs: Vec<Result<vm::VmRun>> = std::thread::scope(|s| {
        let lab = &lab;
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| s.spawn(move || vm::boot(lab, spec)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("VM thread panicked")))
            })
            .collect()
    });
    if crate::netns::interrupted() {
        drop(lab); // waits for the signal-driven cleanup, which exits the process
        bail!("interrupted");
    }
    // stop the servers gracefully so they flush their state before `trace` reads it
    lab.stop_all(Duration::from_secs(5));

    let mut reports = Vec::new();
    for (spec, r) in specs.iter().zip(runs) {
        let run = match r {
            Ok(run) => run,
            Err(e) => {
                reports.push(VmReport {
                    index: spec.index,
                    mac: spec.mac.clone(),
                    outcome: VmOutcome::Failed {
                        after: Duration::ZERO,
                        reason: format!("{e:#}"),
                    },
                    console_log: spec.log_path.clone(),
                    timeline: Vec::new(),
                    trace_error: None,
                });
                continue;
            }
        };
        let (timeline, trace_error) = timeline_for(&run, &opts.server, config.as_deref());
        reports.push(VmReport {
            index: run.index,
            mac: run.mac.clone(),
            outcome: run.outcome.clone(),
            console_log: run.log_path.clone(),
            timeline,
            trace_error,
        });
    }
    for r in &reports {
        print_timeline(r);
    }
    let ok = reports.iter().all(|r| match opts.refuse_unsigned {
        false => r.outcome.is_ok(),
        true => matches!(r.outcome, VmOutcome::Expected { .. }),
    });
    if !ok {
        for f in [
            "fleetboot.log",
            "dnsmasq.log",
            "dnsmasq.err",
            "dhcp-dnsmasq.log",
            "http.log",
        ] {
            let p = work.join(f);
            if p.exists() {
                println!(
                    "--- last lines of {} ---\n{}",
                    p.display(),
                    log_tail(&p, 15)
                );
            }
        }
    }
    drop(lab);
    let total = t0.elapsed();
    let kept = opts.keep || !temp || !ok;
    if !kept {
        let _ = fs::remove_dir_all(&work);
    }
    let report = LabReport {
        mode: opts.mode,
        firmware: opts.firmware,
        loader,
        expect_refusal: opts.refuse_unsigned,
        server: opts.server.name(),
        nonce,
        vms: reports,
        total,
        work_dir: work,
        work_dir_kept: kept,
    };
    println!("{report}");
    Ok(report)
}

fn print_timeline(r: &VmReport) {
    let head = format!("vm{} {}", r.index, r.mac);
    if let Some(e) = &r.trace_error {
        println!("{head}  (server events unavailable: {e}; console-only timeline)");
    }
    for t in &r.timeline {
        let src = match t.source {
            TimelineSource::Server => "srv",
            TimelineSource::Console => "con",
        };
        println!("{head}  {:+7.2}s {src} {:<22} {}", t.at, t.kind, t.detail);
    }
    match &r.outcome {
        VmOutcome::Marker(d) => println!("{head}  {:+7.2}s FLEETBOOT-LAB-MARKER", d.as_secs_f64()),
        VmOutcome::Expected { after, line } => println!("{head}  {:+7.2}s {line}", after.as_secs_f64()),
        other => println!("{head}  {other}  (console: {})", r.console_log.display()),
    }
}

/// Server events (fleetboot only) and console milestones, sorted by time.
fn timeline_for(
    run: &vm::VmRun,
    server: &ServerKind,
    config: Option<&Path>,
) -> (Vec<TimelineEntry>, Option<String>) {
    let mut out: Vec<TimelineEntry> = vm::console_milestones(&run.console)
        .into_iter()
        .map(|(at, label, line)| TimelineEntry {
            at: at.as_secs_f64(),
            source: TimelineSource::Console,
            kind: label.to_string(),
            detail: line,
        })
        .collect();
    let mut err = None;
    if let (ServerKind::Fleetboot { exe }, Some(cfg)) = (server, config) {
        match trace(exe, cfg, &run.mac) {
            Ok(events) => {
                let start_ms = run
                    .started
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as i64;
                out.extend(events.into_iter().map(|e| TimelineEntry {
                    at: (e.ts_ms - start_ms) as f64 / 1000.0,
                    source: TimelineSource::Server,
                    kind: e.kind,
                    detail: e.detail.unwrap_or_default(),
                }));
            }
            Err(e) => err = Some(format!("{e:#}")),
        }
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    (out, err)
}

/// Runs `EXE trace MAC --config CFG --json` (bounded) and parses its events.
pub fn trace(exe: &Path, config: &Path, mac: &str) -> Result<Vec<TraceEvent>> {
    let mut c = Command::new("timeout");
    c.arg("15")
        .arg(exe)
        .args(["trace", mac, "--config"])
        .arg(config)
        .arg("--json");
    let out = output_with_timeout(c, Duration::from_secs(20))?;
    if !out.status.success() {
        bail!(
            "`{} trace` failed ({}): {}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing `fleetboot trace --json` output")
}

/// How the VMs of a run boot: what the served root, fleetboot's config and the reference
/// dnsmasq config are made for.
#[derive(Clone, Copy, Debug)]
struct BootSetup {
    firmware: Firmware,
    loader: Loader,
    refuse_unsigned: bool,
    vms: usize,
}

/// The default per-VM time limit of a firmware under TCG on a shared 2-core machine.
pub fn default_vm_timeout(firmware: Firmware) -> Duration {
    Duration::from_secs(match firmware {
        Firmware::Bios => 180,
        Firmware::Uefi | Firmware::UefiHttp => 300,
        Firmware::SecureBoot => 360,
        Firmware::Arm64 => 900,
    })
}

/// Where Debian puts the boot files the lab serves (packages: ipxe, shim-signed,
/// grub-efi-amd64-signed, pxelinux, syslinux-common).
pub const SNPONLY_EFI: &str = "/usr/lib/ipxe/snponly.efi";
pub const IPXE_EFI: &str = "/usr/lib/ipxe/ipxe.efi";
pub const SHIM_SIGNED: &str = "/usr/lib/shim/shimx64.efi.signed";
pub const GRUB_NET_SIGNED: &str = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed";
pub const LPXELINUX: &str = "/usr/lib/PXELINUX/lpxelinux.0";
pub const LDLINUX_C32: &str = "/usr/lib/syslinux/modules/bios/ldlinux.c32";

fn copy_into(from: &Path, root: &Path, name: &str) -> Result<()> {
    let to = root.join(name);
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
        set_mode(dir, 0o755)?;
    }
    fs::copy(from, &to).with_context(|| {
        format!("copying {} to {} (run scripts/setup.sh as root)", from.display(), to.display())
    })?;
    set_mode(&to, 0o644)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    set_mode(to, 0o755)?;
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), &target)?;
            set_mode(&target, 0o644)?;
        }
    }
    Ok(())
}

/// The served root: the payload for the firmware's architecture and the boot files its
/// loader needs, copied from where Debian installs them.
fn fill_root(root: &Path, firmware: Firmware, loader: Loader, refuse_unsigned: bool) -> Result<()> {
    if firmware == Firmware::Arm64 {
        let payload = crate::payload::ensure_part(None, Part::Arm64)?;
        for f in ["vmlinuz", "initrd.gz"] {
            copy_into(&payload.join("arm64").join(f), root, &format!("arm64/{f}"))?;
        }
        copy_into(&payload.join("arm64/grubnetaa64.efi"), root, "grubaa64.efi")?;
        return Ok(());
    }
    let payload = crate::payload::ensure(None)?;
    for f in crate::payload::FILES {
        copy_into(&payload.join(f), root, f)?;
    }
    match (firmware, loader) {
        (Firmware::Bios, Loader::Grub) => {
            let payload = crate::payload::ensure_part(None, Part::GrubPc)?;
            copy_tree(&payload.join("grub-pc/grub"), &root.join("grub"))?;
        }
        (Firmware::Bios, Loader::Pxelinux) => {
            copy_into(Path::new(LPXELINUX), root, "lpxelinux.0")?;
            copy_into(Path::new(LDLINUX_C32), root, "ldlinux.c32")?;
        }
        (Firmware::Bios, _) => {}
        (_, Loader::Grub) => {
            copy_into(Path::new(SHIM_SIGNED), root, "shimx64.efi")?;
            copy_into(Path::new(GRUB_NET_SIGNED), root, "grubx64.efi")?;
        }
        _ => {
            copy_into(Path::new(SNPONLY_EFI), root, "snponly.efi")?;
            copy_into(Path::new(IPXE_EFI), root, "ipxe.efi")?;
        }
    }
    if refuse_unsigned {
        copy_into(Path::new(SNPONLY_EFI), root, "snponly.efi")?;
    }
    Ok(())
}

/// The lab's kernel, initrd and kernel arguments for a firmware's architecture. On x86,
/// `no_timer_check`: under TCG on a loaded host the kernel's IO-APIC timer check can miss
/// its ticks and panic ("IO-APIC + timer doesn't work!"), which says nothing about booting.
fn payload_paths(firmware: Firmware) -> (&'static str, &'static str, &'static str) {
    match firmware {
        Firmware::Arm64 => ("arm64/vmlinuz", "arm64/initrd.gz", "console=ttyAMA0"),
        _ => ("vmlinuz", "initrd.gz", "console=ttyS0 no_timer_check"),
    }
}

/// The first boot file of the lab's Linux plan, when it is not iPXE.
fn loader_file(setup: &BootSetup) -> Option<&'static str> {
    if setup.refuse_unsigned {
        return Some("snponly.efi");
    }
    match (setup.loader, setup.firmware) {
        (Loader::Grub, Firmware::Bios) => Some("grub/i386-pc/core.0"),
        (Loader::Grub, Firmware::SecureBoot) => Some("shimx64.efi"),
        (Loader::Grub, Firmware::Arm64) => Some("grubaa64.efi"),
        (Loader::Grub, _) => Some("grubx64.efi"),
        (Loader::Pxelinux, _) => Some("lpxelinux.0"),
        _ => None,
    }
}

fn ipxe_efi_file(loader: Loader) -> &'static str {
    if loader == Loader::IpxeFull { "ipxe.efi" } else { "snponly.efi" }
}

/// The fleetboot config the lab uses for BIOS VMs with QEMU's iPXE ROM (see
/// examples/fleetboot.toml).
pub fn fleetboot_config(work: &Path, root: &Path, nonce: &str, mode: Mode) -> String {
    let setup = BootSetup { firmware: Firmware::Bios, loader: Loader::Ipxe, refuse_unsigned: false, vms: 1 };
    config_for(work, root, nonce, mode, &setup)
}

/// The fleetboot config the lab uses for `firmware` booting through `loader`.
pub fn fleetboot_config_for(work: &Path, root: &Path, nonce: &str, opts: &LabOptions) -> String {
    let setup = BootSetup { firmware: opts.firmware, loader: opts.loader(), refuse_unsigned: opts.refuse_unsigned, vms: opts.vms };
    config_for(work, root, nonce, opts.mode, &setup)
}

fn config_for(work: &Path, root: &Path, nonce: &str, mode: Mode, setup: &BootSetup) -> String {
    let transport = if mode == Mode::Tftp { "tftp" } else { "http" };
    let dhcp = if mode == Mode::Proxy {
        "[dhcp]\nmode = \"proxy\"\n".to_string()
    } else {
        format!(
            "[dhcp]\nmode = \"server\"\nauthoritative = true\n\n[[dhcp.subnet]]\n\
             network = \"10.77.0.0/24\"\nrange = [\"10.77.0.100\", \"10.77.0.199\"]\n\
             router = \"{SERVER_ADDR}\"\nlease_time = 3600\n"
        )
    };
    let efi = ipxe_efi_file(setup.loader);
    let (kernel, initrd, console) = payload_paths(setup.firmware);
    let loader = loader_file(setup).map(|l| format!(", loader = \"{l}\"")).unwrap_or_default();
    format!(
        "# written by fleetboot-lab (firmware {firmware}, loader {loader_name})\n\
         data_dir = {data:?}\n\n\
         [server]\naddress = \"{SERVER_ADDR}\"\ninterface = \"{SERVER_IF}\"\nroot = {root:?}\n\n\
         {dhcp}\n\
         [pxe]\ntransport = \"{transport}\"\nuefi_x64 = \"{efi}\"\nuefi_http = \"{efi}\"\n\n\
         [tftp]\nenabled = true\nlisten = \"0.0.0.0:69\"\n\n\
         [http]\nenabled = true\nlisten = \"0.0.0.0:{FB_HTTP_PORT}\"\n\n\
         [router_advertisement]\nenabled = true\n\n\
         [[profile]]\nname = \"lab\"\npriority = 10\n\
         boot = {{ kind = \"linux\", kernel = \"{kernel}\", initrd = [\"{initrd}\"]{loader}, \
         cmdline = \"{console} panic=-1 fleetboot.nonce={nonce}-{{mac_hyphen}}\" }}\n",
        firmware = setup.firmware,
        loader_name = setup.loader,
        data = work.join("data").display().to_string(),
        root = root.display().to_string(),
    )
}

fn start_fleetboot(
    lab: &mut Lab,
    exe: &Path,
    work: &Path,
    root: &Path,
    nonce: &str,
    mode: Mode,
    setup: &BootSetup,
) -> Result<PathBuf> {
    fs::create_dir_all(work.join("data"))?;
    let cfg = work.join("fleetboot.toml");
    fs::write(&cfg, config_for(work, root, nonce, mode, setup))?;
    if mode == Mode::Proxy {
        start_address_dhcp(lab, work)?;
    }
    let log = fs::File::create(work.join("fleetboot.log"))?;
    let mut c = lab.cmd(lab.server_ns(), "timeout");
    c.arg(SERVER_TIMEOUT_SECS.to_string())
        .arg(exe)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let pid = lab.spawn("fleetboot", c)?;
    // UEFI firmware and every loader but iPXE-over-HTTP fetch over TFTP.
    let mut wants = vec![(Proto::Udp, 67), (Proto::Udp, 69)];
    if mode != Mode::Tftp {
        wants.push((Proto::Tcp, FB_HTTP_PORT));
    }
    wait_ready(lab, pid, &wants, &work.join("fleetboot.log"))?;
    Ok(cfg)
}

fn wait_ready(lab: &mut Lab, pid: u32, wants: &[(Proto, u16)], log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let ns = lab.server_ns().to_string();
    loop {
        if let Some(st) = lab.exited(pid) {
            bail!(
                "the server exited early ({st}); last lines of {}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        let mut all = true;
        for &(p, port) in wants {
            all &= lab.is_listening(&ns, p, port)?;
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the server does not listen on {wants:?} after 20 s; last lines of {}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mode::Proxy: the network's existing DHCP server, addresses only (no boot options), in
/// its own namespace at 10.77.0.2 like a router would be.
fn start_address_dhcp(lab: &mut Lab, work: &Path) -> Result<()> {
    let c = lab.add_client(Some(PROXY_DHCP_ADDR))?;
    let conf = work.join("dhcp-dnsmasq.conf");
    fs::write(
        &conf,
        format!(
            "port=0\ninterface={ifname}\nbind-interfaces\nlog-dhcp\nlog-facility={log}\n\
             dhcp-leasefile={leases}\ndhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h\n\
             dhcp-authoritative\nno-ping\ndhcp-option=option:router,{SERVER_ADDR}\n",
            ifname = c.ifname,
            log = work.join("dhcp-dnsmasq.log").display(),
            leases = work.join("dhcp-leases").display(),
        ),
    )?;
    let mut cmd = lab.cmd(&c.ns, "timeout");
    cmd.arg(SERVER_TIMEOUT_SECS.to_string())
        .arg("dnsmasq")
        .arg("--no-daemon")
        .arg(format!("--conf-file={}", conf.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join("dhcp-dnsmasq.err"))?);
    let pid = lab.spawn("dnsmasq (addresses)", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.is_listening(&c.ns, Proto::Udp, 67)? {
        if let Some(st) = lab.exited(pid) {
            bail!(
                "address dnsmasq exited ({st}): {}",
                log_tail(&work.join("dhcp-dnsmasq.err"), 5)
            );
        }
        ensure!(
            Instant::now() < deadline,
            "address dnsmasq does not listen on 67"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The hand-written per-client files an operator of the dnsmasq reference would keep in
/// the TFTP root for GRUB (`grub/grub.cfg` sending each GRUB to `grub/<MAC>.cfg`) or
/// PXELINUX (`pxelinux.cfg/01-<mac>`).
fn write_reference_loader_configs(root: &Path, nonce: &str, setup: &BootSetup) -> Result<()> {
    let (kernel, initrd, console) = payload_paths(setup.firmware);
    let write = |name: &str, text: String| -> Result<()> {
        let p = root.join(name);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)?;
            set_mode(d, 0o755)?;
        }
        fs::write(&p, text)?;
        set_mode(&p, 0o644)
    };
    for i in 0..setup.vms {
        let mac = vm::mac_for(i);
        let cmdline = format!("{console} panic=-1 fleetboot.nonce={nonce}-{}", vm::mac_hyphen(&mac));
        match setup.loader {
            Loader::Grub => write(
                &format!("grub/{mac}.cfg"),
                format!("set timeout=0\nlinux /{kernel} {cmdline}\ninitrd /{initrd}\nboot\n"),
            )?,
            Loader::Pxelinux => write(
                &format!("pxelinux.cfg/01-{}", vm::mac_hyphen(&mac)),
                format!("DEFAULT lab\nPROMPT 0\nLABEL lab\n  KERNEL {kernel}\n  INITRD {initrd}\n  APPEND {cmdline}\n"),
            )?,
            _ => {}
        }
    }
    if setup.loader == Loader::Grub {
        write("grub/grub.cfg", "configfile ${prefix}/${net_default_mac}.cfg\n".to_string())?;
    }
    Ok(())
}

/// The dnsmasq reference server: the plain PXE/iPXE setup dnsmasq's documentation gives
/// (DHCP or ProxyDHCP, TFTP, an IPv6 RA, iPXE detected by user class, `python3 -m
/// http.server` for HTTP), with the tags and boot files it gives for UEFI clients.
fn start_reference(
    lab: &mut Lab,
    work: &Path,
    root: &Path,
    nonce: &str,
    mode: Mode,
    setup: &BootSetup,
) -> Result<()> {
    // UEFI HTTP Boot needs an http:// boot file whatever the transport of the rest.
    let http = mode != Mode::Tftp || setup.firmware == Firmware::UefiHttp;
    let (base, boot) = match mode {
        Mode::Tftp => (format!("tftp://{SERVER_ADDR}"), "boot.ipxe".to_string()),
        Mode::Http | Mode::Proxy => {
            let u = format!("http://{SERVER_ADDR}:{PY_HTTP_PORT}");
            (u.clone(), format!("{u}/boot.ipxe"))
        }
    };
    // iPXE on UEFI: this kernel's EFI stub only finds an initrd named on its command line.
    let initrd_name = if setup.firmware.is_uefi() { "initrd=initrd.gz " } else { "" };
    let (_, _, args) = payload_paths(setup.firmware);
    fs::write(
        root.join("boot.ipxe"),
        format!(
            "#!ipxe\nkernel {base}/vmlinuz {initrd_name}{args} panic=-1 fleetboot.nonce={nonce}-${{mac:hexhyp}}\n\
             initrd {base}/initrd.gz\nboot\n"
        ),
    )?;
    set_mode(&root.join("boot.ipxe"), 0o644)?;
    write_reference_loader_configs(root, nonce, setup)?;
    let mut conf = format!(
        "port=0\ninterface={SERVER_IF}\nbind-interfaces\nlog-dhcp\nlog-facility={log}\n\
         dhcp-leasefile={leases}\n",
        log = work.join("dnsmasq.log").display(),
        leases = work.join("leases").display(),
    );
    if mode == Mode::Proxy {
        start_address_dhcp(lab, work)?;
        // ProxyDHCP: no addresses; iPXE must wait for the proxy offer, so no option 175/176
        conf += "dhcp-range=10.77.0.0,proxy,255.255.255.0\n";
    } else {
        conf +=
            "dhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h\ndhcp-authoritative\nno-ping\n";
    }
    conf += &format!(
        "enable-ra\ndhcp-range=fd77::,ra-only,64\nenable-tftp\ntftp-root={root}\n\
         dhcp-userclass=set:ipxe,iPXE\n",
        root = root.display()
    );
    let loader = loader_file(setup);
    let first = match (setup.firmware, loader) {
        (Firmware::Bios, None) => None,
        (Firmware::Bios, Some(l)) => Some(format!("dhcp-boot=tag:ipxe,{l}\n")),
        (Firmware::Uefi | Firmware::SecureBoot, l) => Some(format!(
            "dhcp-match=set:efi64,option:client-arch,7\ndhcp-match=set:efi64,option:client-arch,9\n\
             dhcp-boot=tag:efi64,tag:!ipxe,{}\n",
            l.unwrap_or(ipxe_efi_file(setup.loader))
        )),
        (Firmware::UefiHttp, _) => Some(format!(
            "dhcp-match=set:efihttp,option:client-arch,16\ndhcp-option-force=tag:efihttp,60,HTTPClient\n\
             dhcp-boot=tag:efihttp,tag:!ipxe,http://{SERVER_ADDR}:{PY_HTTP_PORT}/{}\n",
            ipxe_efi_file(setup.loader)
        )),
        (Firmware::Arm64, l) => Some(format!(
            "dhcp-match=set:arm64,option:client-arch,11\ndhcp-boot=tag:arm64,{}\n",
            l.unwrap_or("grubaa64.efi")
        )),
    };
    if let Some(f) = &first {
        conf += f;
    }
    if mode == Mode::Proxy {
        conf += &format!(
            "pxe-service=tag:ipxe,x86PC,\"fleetboot-lab\",{boot}\ndhcp-boot=tag:ipxe,{boot}\n"
        );
    } else if setup.firmware == Firmware::Bios && loader.is_some() {
        // The iPXE ROM takes the loader above; no script.
        conf += "dhcp-option=tag:ipxe,encap:175,176,1b\n";
    } else {
        conf += &format!("dhcp-option=tag:ipxe,encap:175,176,1b\ndhcp-boot=tag:ipxe,{boot}\n");
    }
    let conf_path = work.join("dnsmasq.conf");
    fs::write(&conf_path, conf)?;
    let mut c = lab.cmd(lab.server_ns(), "timeout");
    c.arg(SERVER_TIMEOUT_SECS.to_string())
        .arg("dnsmasq")
        .arg("--no-daemon")
        .arg(format!("--conf-file={}", conf_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(work.join("dnsmasq.err"))?);
    let pid = lab.spawn("dnsmasq", c)?;
    let mut wants = vec![(Proto::Udp, 67), (Proto::Udp, 69)];
    if http {
        let log = fs::File::create(work.join("http.log"))?;
        let mut h = lab.cmd(lab.server_ns(), "timeout");
        h.arg(SERVER_TIMEOUT_SECS.to_string())
            .args([
                "python3",
                "-m",
                "http.server",
                &PY_HTTP_PORT.to_string(),
                "--bind",
                SERVER_ADDR,
            ])
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        lab.spawn("python3 http.server", h)?;
        wants.push((Proto::Tcp, PY_HTTP_PORT));
    }
    wait_ready(lab, pid, &wants, &work.join("dnsmasq.err"))
}

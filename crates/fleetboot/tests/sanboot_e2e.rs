//! End to end: iPXE `sanboot` of a catalog image over HTTP. One QEMU VM (TCG) with QEMU's
//! iPXE ROM gets its script from `fleetboot serve` through a `sanboot` profile, and iPXE
//! boots the image `GET /images/NAME` serves as a SAN disk (BIOS INT 13h over HTTP Range
//! reads).
//!
//! The image is built here: a boot sector that reads sector 2048 (1 MiB into the disk)
//! through INT 13h extended read and prints it on the serial port, and in that sector the
//! lab marker line with this run's nonce and the VM's MAC. The marker can therefore only
//! appear if iPXE booted the image and served a read from its middle; fleetboot's trace
//! must show the ranged image reads (`HTTP-IMAGE`) of that VM. Pass/fail is the marker and
//! the trace, never a time.
//!
//! Needs root, QEMU and the lab packages (scripts/setup.sh); skips otherwise unless
//! `FLEETBOOT_REQUIRE_E2E=1`.

use fleetboot_lab::netns::{Lab, Proto};
use fleetboot_lab::vm::{self, VmSpec};
use fleetboot_lab::{gate, Mode};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");
const IMAGE: &str = "sanlab";
/// Where the marker sector lives: a read the boot sector makes, not iPXE's first one.
const MARKER_LBA: usize = 2048;

/// The boot sector (16-bit real mode, loaded at 0:7C00, DL = the boot drive):
/// ```text
///   cli; xor ax,ax; mov ds,ax; mov es,ax; mov ss,ax; mov sp,0x7c00; sti
///   mov si,0x7c30 (dap); mov ah,0x42; int 0x13      ; extended read, 1 sector of LBA 2048
///   jc fail                                        ;   to 0:8000
///   mov si,0x8000
/// print: lodsb; test al,al; jz done; mov dx,0x3f8; out dx,al; jmp print   ; COM1
/// fail:  mov si,0x7c46 (failmsg); jmp print
/// done:  lidt [0x7c40] (limit 0); int3; hlt        ; triple fault: QEMU -no-reboot exits
/// dap:   db 16,0; dw 1; dw 0x8000,0; dq 2048
/// noidt: dw 0; dd 0
/// failmsg: "\r\nFLEETBOOT-SANBOOT-READ-FAILED\r\n",0
/// ```
/// (assembled with GNU as `.code16`, `ld -Ttext 0 --oformat binary`).
const BOOT_SECTOR: [u8; 104] = [
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xfb, 0xbe, 0x30, 0x7c,
    0xb4, 0x42, 0xcd, 0x13, 0x72, 0x0e, 0xbe, 0x00, 0x80, 0xac, 0x84, 0xc0, 0x74, 0x0b, 0xba, 0xf8,
    0x03, 0xee, 0xeb, 0xf5, 0xbe, 0x46, 0x7c, 0xeb, 0xf0, 0x0f, 0x01, 0x1e, 0x40, 0x7c, 0xcc, 0xf4,
    0x10, 0x00, 0x01, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0d, 0x0a, 0x46, 0x4c, 0x45, 0x45, 0x54, 0x42, 0x4f, 0x4f,
    0x54, 0x2d, 0x53, 0x41, 0x4e, 0x42, 0x4f, 0x4f, 0x54, 0x2d, 0x52, 0x45, 0x41, 0x44, 0x2d, 0x46,
    0x41, 0x49, 0x4c, 0x45, 0x44, 0x0d, 0x0a, 0x00,
];

/// A 16 MiB disk: the boot sector (with its 0x55AA signature) and, at [`MARKER_LBA`], the
/// marker line `vm::marker_for(nonce, mac)` the VM must print. Not smaller: with no
/// partition table iPXE gives the drive 255 heads and 63 sectors per track, and a disk
/// under one such cylinder (7.8 MiB) has no sector it can read by CHS, the MBR included.
fn disk_image(marker: &str) -> Vec<u8> {
    let mut d = vec![0u8; 16 << 20];
    d[..BOOT_SECTOR.len()].copy_from_slice(&BOOT_SECTOR);
    d[510] = 0x55;
    d[511] = 0xaa;
    let line = format!("\r\n{marker}\r\n\0");
    assert!(line.len() <= 512);
    let at = MARKER_LBA * 512;
    d[at..at + line.len()].copy_from_slice(line.as_bytes());
    d
}

fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:012x}", (t as u64 ^ u64::from(std::process::id()) << 32) & 0xffff_ffff_ffff)
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Removes the work directory on success (kept on failure, or with FLEETBOOT_E2E_KEEP=1).
struct WorkDir(PathBuf, bool);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.1 && std::env::var("FLEETBOOT_E2E_KEEP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn ipxe_sanboots_a_catalog_image_over_http() {
    if !gate::e2e_ready(
        "ipxe_sanboots_a_catalog_image_over_http",
        &["qemu-system-x86_64", "ip", "ss", "timeout"],
    ) {
        return;
    }
    let mut work = WorkDir(
        std::env::temp_dir().join(format!("fleetboot-sanboot-{}", std::process::id())),
        false,
    );
    let dir = work.0.clone();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let nonce = nonce();

    let mut lab = Lab::new().expect("creating the lab namespaces");
    let tap = lab.add_tap().unwrap();
    let spec = VmSpec::new(0, &tap, &nonce, &dir);

    // The lab's own configuration, with a sanboot profile ahead of its Linux one.
    let cfg = dir.join("fleetboot.toml");
    let mut text = fleetboot_lab::fleetboot_config(&dir, &dir.join("root"), &nonce, Mode::Http);
    text.push_str(&format!(
        "\n[[profile]]\nname = \"san\"\npriority = 1\nboot = {{ kind = \"sanboot\", image = \"{IMAGE}\" }}\n"
    ));
    std::fs::write(&cfg, text).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, disk_image(&vm::marker_for(&nonce, &spec.mac))).unwrap();
    let import = Command::new(BIN)
        .args(["image", "import"])
        .arg(&disk)
        .args(["--name", IMAGE, "--format", "raw", "--config"])
        .arg(&cfg)
        .output()
        .expect("fleetboot image import");
    assert!(import.status.success(), "import: {}", String::from_utf8_lossy(&import.stderr));

    let log = dir.join("fleetboot.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut serve = lab.cmd(lab.server_ns(), "timeout");
    serve
        .args(["600", BIN, "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    lab.spawn("fleetboot serve", serve).unwrap();
    let srv = lab.server_ns().to_string();
    for (proto, port) in [(Proto::Udp, 67), (Proto::Tcp, 8080)] {
        if let Err(e) = lab.wait_listening(&srv, proto, port, Duration::from_secs(30)) {
            panic!("{e:#}\n{}", tail(&log, 30));
        }
    }

    let t0 = Instant::now();
    let run = vm::boot(&lab, &spec).expect("starting the VM");
    let console: Vec<String> = run.console.iter().map(|l| vm::strip_ansi(&l.text)).collect();
    assert!(
        run.outcome.is_ok(),
        "{}: the VM did not print its marker\nconsole (last 25 lines):\n{}\nserver log:\n{}",
        run.outcome,
        console[console.len().saturating_sub(25)..].join("\n"),
        tail(&log, 30)
    );
    // iPXE booted through sanboot (not the Linux profile's kernel).
    assert!(
        console.iter().any(|l| l.contains("sanboot") || l.contains("SAN device")),
        "no sign of sanboot on the console:\n{}",
        console.join("\n")
    );
    eprintln!("sanboot: marker after {} ({:.1} s of wall time)", run.outcome, t0.elapsed().as_secs_f64());

    // The server's trace: this VM read the image in ranges, one of them over the marker.
    lab.stop_all(Duration::from_secs(5));
    let events = fleetboot_lab::trace(Path::new(BIN), &cfg, &spec.mac).expect("fleetboot trace");
    let reads: Vec<String> = events
        .iter()
        .filter(|e| e.kind == "HTTP-IMAGE")
        .filter_map(|e| e.detail.clone())
        .collect();
    let covers = |d: &str, at: u64| {
        d.rsplit_once("bytes ")
            .and_then(|(_, r)| r.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .and_then(|(s, e)| Some((s.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
            .is_some_and(|(s, e)| s <= at && at <= e)
    };
    let at = (MARKER_LBA * 512) as u64;
    assert!(
        reads.iter().all(|d| d.contains(&format!("/images/{IMAGE}"))),
        "{reads:#?}"
    );
    assert!(
        reads.iter().any(|d| covers(d, at)),
        "no ranged read of byte {at} in this VM's trace: {reads:#?}"
    );
    work.1 = true;
}

//! `fleetboot lab` and `fleetboot emulate`: the QEMU boot lab (`fleetboot-lab`) and the
//! boot-storm emulator (`fleetboot-emulator`). Only with the `lab` cargo feature (on by
//! default); nothing that serves clients uses them.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, ValueEnum)]
pub enum LabMode {
    /// fleetboot hands out addresses; iPXE loads its script, kernel and initrd over HTTP.
    Http,
    /// fleetboot hands out addresses; everything over TFTP.
    Tftp,
    /// dnsmasq hands out addresses; fleetboot answers as ProxyDHCP.
    Proxy,
}

#[derive(Args)]
pub struct LabArgs {
    #[arg(long, default_value_t = 1)]
    vms: usize,
    #[arg(long, value_enum, default_value_t = LabMode::Http)]
    mode: LabMode,
    /// Also boot the same VMs from the dnsmasq reference setup, alternating, this many
    /// times each, and print the medians side by side.
    #[arg(long)]
    compare: Option<usize>,
    /// Keep the work directory (configs, logs, consoles) after the run.
    #[arg(long)]
    keep: bool,
    /// The VMs' firmware: bios (QEMU's iPXE ROM), uefi (OVMF PXE), uefi-http (OVMF
    /// HTTP Boot), secureboot (OVMF, Secure Boot enforced, Microsoft keys: shim + signed
    /// GRUB), arm64 (AAVMF under qemu-system-aarch64).
    #[arg(long, default_value = "bios")]
    firmware: fleetboot_lab::Firmware,
    /// The first boot file: ipxe, ipxe-full (ipxe.efi), grub, pxelinux (BIOS). Default:
    /// iPXE, or GRUB for secureboot and arm64.
    #[arg(long)]
    loader: Option<fleetboot_lab::Loader>,
    /// secureboot only: offer Debian's unsigned iPXE and pass when the firmware refuses it.
    #[arg(long)]
    unsigned: bool,
}

/// Boots the VMs from this executable's `fleetboot serve`; fails unless every VM printed
/// its marker.
pub fn lab(args: LabArgs) -> Result<()> {
    use fleetboot_lab::{LabOptions, Mode, ServerKind};
    let LabArgs { vms, mode, compare, keep, firmware, loader, unsigned: refuse_unsigned } = args;
    if !(1..=3).contains(&vms) {
        bail!("--vms: at most 3 VMs at once on this class of machine (got {vms})");
    }
    let mode = match mode {
        LabMode::Http => Mode::Http,
        LabMode::Tftp => Mode::Tftp,
        LabMode::Proxy => Mode::Proxy,
    };
    let exe = std::env::current_exe()?;
    let mut opts = LabOptions::new(vms, mode, ServerKind::Fleetboot { exe });
    opts.keep = keep;
    (opts.firmware, opts.loader, opts.refuse_unsigned) = (firmware, loader, refuse_unsigned);
    if let Some(runs) = compare {
        let cmp = fleetboot_lab::bench::compare(&opts, runs)?;
        println!("{cmp}");
        return Ok(());
    }
    let report = fleetboot_lab::run(opts)?;
    if !report.success() && refuse_unsigned {
        bail!("not every VM's firmware refused the unsigned boot file (logs: {})", report.work_dir.display());
    }
    if !report.success() {
        let failed = vms - report.marker_times().len();
        bail!("{failed} of {vms} VMs did not reach the marker (logs: {})", report.work_dir.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct EmulateArgs {
    #[arg(long)]
    clients: usize,
    /// The interface the clients share (e.g. eth0 of a lab client namespace).
    #[arg(long)]
    interface: String,
    #[arg(long, default_value_t = 1432)]
    tftp_blksize: u16,
    #[arg(long, default_value_t = 1)]
    tftp_windowsize: u16,
    /// Everything stops after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Print the whole report (every client's timeline) as JSON.
    #[arg(long)]
    json: bool,
    /// NAME=SHA256: every client must fetch the file named NAME with this hash (repeatable).
    #[arg(long, value_name = "NAME=SHA256")]
    expect: Vec<String>,
    /// MAC of client 0; client i gets this plus i.
    #[arg(long, default_value_t = fleetboot_emulator::DEFAULT_MAC_BASE)]
    mac_base: fleetboot_boot::MacAddr,
    /// Milliseconds between one client's start and the next (0: all at once).
    #[arg(long, default_value_t = 0)]
    stagger_ms: u64,
    /// Send a DHCPRELEASE for every lease at the end.
    #[arg(long)]
    release: bool,
    /// PXE MTFTP mode: each client is a PXE ROM that, after DHCP, asks a boot server on
    /// UDP 4011 (obeying fleetboot's wait packets) and fetches the boot file it names
    /// over PXE multicast TFTP, instead of iPXE's script, kernel and initrd.
    #[arg(long)]
    pxe_mtftp: bool,
    /// Boot server to ask in PXE MTFTP mode (repeatable; tried in turn). Default: those
    /// the ProxyDHCP offer lists for the boot type, else the ProxyDHCP server, else the
    /// DHCP server.
    #[arg(long = "boot-server", value_name = "IP", requires = "pxe_mtftp")]
    boot_server: Vec<std::net::Ipv4Addr>,
    /// Boot server type to ask for in PXE MTFTP mode (0x8000 or decimal; `fleetboot
    /// negotiate` serves boot_files[N - 0x8000]). Default: the ProxyDHCP offer's first
    /// menu item, else 0x8000.
    #[arg(long, value_name = "N", requires = "pxe_mtftp",
          value_parser = fleetboot_emulator::pxe::parse_boot_type)]
    boot_type: Option<u16>,
    /// Stream mode: after DHCP, each client receives the image from fleetboot's multicast
    /// stream on this group (GROUP:PORT) from its own address, and checks it against
    /// --stream-sha256. Needs the site secret (--site-secret-file or
    /// FLEETBOOT_STREAM_SECRET) and the sender's public key (--sender-key-file or
    /// FLEETBOOT_STREAM_SENDER_KEY).
    #[arg(long, value_name = "GROUP:PORT", requires = "stream_sha256", conflicts_with = "pxe_mtftp")]
    stream: Option<std::net::SocketAddrV4>,
    /// The streamed image's SHA-256 (stream mode).
    #[arg(long, value_name = "SHA256", requires = "stream")]
    stream_sha256: Option<String>,
    /// The site secret's file (stream mode; else FLEETBOOT_STREAM_SECRET).
    #[arg(long, requires = "stream")]
    site_secret_file: Option<std::path::PathBuf>,
    /// The sender's public key file (stream mode; else FLEETBOOT_STREAM_SENDER_KEY).
    #[arg(long, requires = "stream")]
    sender_key_file: Option<std::path::PathBuf>,
}

/// Runs the emulated clients and prints their report; fails unless every client booted.
pub fn emulate(args: EmulateArgs) -> Result<()> {
    let mut opts = fleetboot_emulator::EmulateOptions::new(args.clients, args.interface);
    if args.pxe_mtftp {
        opts.mode = fleetboot_emulator::BootMode::PxeMtftp(fleetboot_emulator::PxeMtftp {
            boot_servers: args.boot_server,
            boot_type: args.boot_type,
        });
    }
    if let (Some(group), Some(sha)) = (args.stream, &args.stream_sha256) {
        use fleetboot_streamd::secret;
        let sha = fleetboot_emulator::sink::parse_sha256(sha).map_err(anyhow::Error::msg)?;
        let site = secret::resolve(args.site_secret_file.as_deref(), None)?;
        let key = secret::resolve_public_key(args.sender_key_file.as_deref())?;
        opts.mode = fleetboot_emulator::BootMode::Stream(fleetboot_emulator::StreamBoot::new(group, sha, site, key));
    }
    opts.tftp.blksize = args.tftp_blksize;
    opts.tftp.windowsize = args.tftp_windowsize;
    opts.timeout = std::time::Duration::from_secs(args.timeout);
    opts.mac_base = args.mac_base;
    opts.stagger = std::time::Duration::from_millis(args.stagger_ms);
    opts.release = args.release;
    for e in &args.expect {
        opts.expect(e)?;
    }
    let report = fleetboot_emulator::run(opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if !report.success() {
        bail!("{} of {} emulated clients did not boot{}", report.failed, report.requested,
            report.stopped.as_deref().map(|s| format!(" ({s})")).unwrap_or_default());
    }
    Ok(())
}

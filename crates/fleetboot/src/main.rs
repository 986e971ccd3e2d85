//! `fleetboot`: one binary, one subcommand per role.
//!
//! - `serve --config FILE`: runs the roles the config enables (DHCP/ProxyDHCP + PXE,
//!   TFTP, HTTP + API, router advertisements) — see [`serve`].
//! - `trace MAC`: a client's boot, event by event, from the store.
//! - `lab`: boots QEMU VMs from fleetboot in private network namespaces (fleetboot-lab).
//! - `check-config`: validates a config file and exits.
//! - `image import|list|show|remove`: the disk image catalog (fleetboot-images).
//! - `nbd`: only the NBD service (catalog images as network disks, fleetboot-nbd).
//! - `negotiate` / `files`: PXE boot server with multicast conflict clearing, and the
//!   multicast TFTP file server (seed 000) — see [`negotiate`].

mod config;
mod fleet;
mod image_cli;
mod negotiate;
mod serve;
mod stream_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "fleetboot", version, about = "Network boot and provisioning for fleets of machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the services the config enables (DHCP, ProxyDHCP, PXE, TFTP, HTTP, API).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The disk image catalog (data_dir/images): import, list, show, remove.
    Image {
        #[command(subcommand)]
        command: image_cli::ImageCommand,
    },
    /// Run only the NBD service (catalog images as network disks; [nbd] in the config),
    /// whether or not nbd.enabled is set.
    Nbd {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Synchronized multicast streaming of catalog images (`stream serve --config FILE`).
    Stream {
        #[command(subcommand)]
        command: stream_cmd::StreamCommand,
    },
    /// Client-side agents (`agent stream`: receive an image's stream, serve it as a local
    /// NBD disk).
    Agent {
        #[command(subcommand)]
        command: stream_cmd::AgentCommand,
    },
    /// PXE boot server on UDP 4011 that clears multicast groups with other negotiators and
    /// prepares them at a file server ([negotiate] in the config; seed 000).
    Negotiate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Multicast TFTP file server: PXE MTFTP, RFC 2090, and the negotiators' prepare/delete
    /// protocol ([files] in the config).
    Files {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The provisioning master alone ([fleet] in the config; `fleetboot serve` runs it too
    /// when fleet.enabled is set).
    Master {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The master's node database: list, show, add, set, remove, approve, forget-key.
    Node {
        #[command(subcommand)]
        command: fleet::cli::NodeCommand,
    },
    /// Classes: nodes that share a software configuration.
    Class {
        #[command(subcommand)]
        command: fleet::cli::ClassCommand,
    },
    /// The package database: list, rollback, prune.
    Package {
        #[command(subcommand)]
        command: fleet::cli::PackageCommand,
    },
    /// Composite bundles: build, keygen, import.
    Bundle {
        #[command(subcommand)]
        command: fleet::cli::BundleCommand,
    },
    /// The whole fleet: prepare all nodes now, campaign status, verifications.
    Fleet {
        #[command(subcommand)]
        command: fleet::cli::FleetCommand,
    },
    /// Validate a config file: prints nothing and exits 0 when it is good.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show every DHCP, ProxyDHCP, TFTP and HTTP event of one client's boot.
    Trace {
        /// The client's MAC address (52:54:00:77:00:10 or 52-54-00-77-00-10).
        mac: fleetboot_boot::MacAddr,
        /// Read the store of the server using this config.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON (an array of {ts_ms, mac, kind, detail}).
        #[arg(long)]
        json: bool,
        /// At most this many of the newest events.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Boot QEMU VMs with their built-in iPXE firmware from fleetboot in private network
    /// namespaces and print each VM's timeline. Needs root, QEMU and the lab packages
    /// (scripts/setup.sh). Exits 0 only if every VM printed its marker.
    Lab {
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
    },
    /// Boot-storm load generator: N emulated iPXE clients on one interface, each with its
    /// own MAC and leased address (DHCP, then script, kernel and initrd over HTTP or TFTP),
    /// or with --pxe-mtftp N PXE ROMs (DHCP, boot server discovery, boot file over PXE
    /// MTFTP). Runs only inside a lab network namespace (`ip netns exec NS fleetboot emulate
    /// ...`). Exits 0 only if every client fetched every file.
    Emulate {
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
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LabMode {
    /// fleetboot hands out addresses; iPXE loads its script, kernel and initrd over HTTP.
    Http,
    /// fleetboot hands out addresses; everything over TFTP.
    Tftp,
    /// dnsmasq hands out addresses; fleetboot answers as ProxyDHCP.
    Proxy,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = config::Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve::run(config))
        }
        Command::Negotiate { config } => negotiate::boot::run(config::Config::load(&config)?),
        Command::Files { config } => negotiate::files::run(config::Config::load(&config)?),
        Command::Master { config } => {
            let config = config::Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(fleet::service::run_standalone(config))
        }
        Command::Node { command } => fleet::cli::run_node(command),
        Command::Class { command } => fleet::cli::run_class(command),
        Command::Package { command } => fleet::cli::run_package(command),
        Command::Bundle { command } => fleet::cli::run_bundle(command),
        Command::Fleet { command } => fleet::cli::run_fleet(command),
        Command::CheckConfig { config } => config::Config::load(&config).map(|_| ()),
        Command::Image { command } => image_cli::run(command),
        Command::Stream { command } => stream_cmd::run_stream(command),
        Command::Agent { command } => stream_cmd::run_agent(command),
        Command::Nbd { config } => {
            let config = config::Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve::nbd::standalone(config))
        }
        Command::Trace { mac, config, json, limit } => trace(mac, &config, json, limit),
        Command::Lab { vms, mode, compare, keep } => lab(vms, mode, compare, keep),
        Command::Emulate { clients, interface, tftp_blksize, tftp_windowsize, timeout, json, expect, mac_base, stagger_ms, release, pxe_mtftp, boot_server, boot_type } => {
            let pxe = pxe_mtftp.then_some(fleetboot_emulator::PxeMtftp { boot_servers: boot_server, boot_type });
            emulate(clients, interface, (tftp_blksize, tftp_windowsize), timeout, json, &expect, mac_base, stagger_ms, release, pxe)
        }
    }
}

fn trace(mac: fleetboot_boot::MacAddr, config: &std::path::Path, json: bool, limit: usize) -> Result<()> {
    let config = config::Config::load(config)?;
    let store = fleetboot_store::ReadOnlyStore::open(&config.db_path())
        .with_context(|| "has this server run yet? (fleetboot serve creates the store)")?;
    let events = store.trace(&mac.to_string(), limit)?;
    if json {
        let v: Vec<_> = events
            .iter()
            .map(|e| serde_json::json!({"ts_ms": e.ts_ms, "mac": e.mac, "kind": e.kind, "detail": e.detail}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if events.is_empty() {
        println!("no events for {mac}");
    }
    let t0 = events.first().map(|e| e.ts_ms).unwrap_or(0);
    for e in &events {
        println!("{} +{:>8.3}s  {:<16} {}", serve::format_ms(e.ts_ms), (e.ts_ms - t0) as f64 / 1000.0, e.kind, e.detail);
    }
    Ok(())
}

fn lab(vms: usize, mode: LabMode, compare: Option<usize>, keep: bool) -> Result<()> {
    use fleetboot_lab::{LabOptions, Mode, ServerKind};
    if !(1..=3).contains(&vms) {
        bail!("--vms: at most 3 VMs at once on this class of machine (got {vms})");
    }
    let mode = match mode {
        LabMode::Http => Mode::Http,
        LabMode::Tftp => Mode::Tftp,
        LabMode::Proxy => Mode::Proxy,
    };
    let exe = std::env::current_exe()?;
    let opts = LabOptions { vms, mode, server: ServerKind::Fleetboot { exe }, keep, work_dir: None };
    if let Some(runs) = compare {
        let cmp = fleetboot_lab::bench::compare(&opts, runs)?;
        println!("{cmp}");
        return Ok(());
    }
    let report = fleetboot_lab::run(opts)?;
    if !report.success() {
        let failed = vms - report.marker_times().len();
        bail!("{failed} of {vms} VMs did not reach the marker (logs: {})", report.work_dir.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn emulate(
    clients: usize,
    interface: String,
    (blksize, windowsize): (u16, u16),
    timeout: u64,
    json: bool,
    expect: &[String],
    mac_base: fleetboot_boot::MacAddr,
    stagger_ms: u64,
    release: bool,
    pxe: Option<fleetboot_emulator::PxeMtftp>,
) -> Result<()> {
    let mut opts = fleetboot_emulator::EmulateOptions::new(clients, interface);
    if let Some(p) = pxe {
        opts.mode = fleetboot_emulator::BootMode::PxeMtftp(p);
    }
    opts.tftp.blksize = blksize;
    opts.tftp.windowsize = windowsize;
    opts.timeout = std::time::Duration::from_secs(timeout);
    opts.mac_base = mac_base;
    opts.stagger = std::time::Duration::from_millis(stagger_ms);
    opts.release = release;
    for e in expect {
        opts.expect(e)?;
    }
    let report = fleetboot_emulator::run(opts)?;
    if json {
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

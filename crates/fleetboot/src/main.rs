//! `fleetboot`: one binary, one subcommand per role. Parses the command line and calls the
//! `fleetboot` library, which has the map of what each role does.

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use fleetboot::config::Config;
use fleetboot::{audit_cli, fleet, image_cli, negotiate, serve, store_cli, stream_cmd, token_cli};
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
    /// prepares them at a file server ([negotiate] in the config).
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
    /// Edge boot cache near a site's clients (`cache --config FILE`, [cache] in the config),
    /// and `cache status|scrub|key|origin-key`.
    Cache(fleetboot::cache::api::CacheArgs),
    /// The provisioning master alone ([fleet] in the config; `fleetboot serve` runs it too
    /// when fleet.enabled is set), and `master status`: who is master, the epoch, each
    /// backup's lag.
    Master(fleet::cli::MasterArgs),
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
    /// The store's schema: migrate (apply what is pending), check (reachable and current?).
    Store {
        #[command(subcommand)]
        command: store_cli::StoreCommand,
    },
    /// Validate a config file: prints nothing and exits 0 when it is good.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check this host for what stops a boot server: the interface and its address, ports,
    /// other DHCP servers, boot files, the clock, data_dir and the store; says how to fix
    /// each. Exits non-zero when a check fails.
    Doctor(fleetboot::doctor::DoctorArgs),
    /// Write the man pages and shell completions (bash, zsh, fish) to a directory.
    #[command(hide = true)]
    Manual(fleetboot::manual::ManualArgs),
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
    /// API tokens: create (printed once, stored hashed), list, revoke.
    Token {
        #[command(subcommand)]
        command: token_cli::TokenCommand,
    },
    /// The audit log: every change made through the API, the config or `fleetboot token`.
    Audit(audit_cli::AuditArgs),
    /// Boot QEMU VMs (iPXE ROM on BIOS, OVMF, AAVMF: --firmware) from fleetboot in private
    /// network namespaces and print each VM's timeline. Needs root, QEMU and the lab packages
    /// (scripts/setup.sh). Exits 0 only if every VM printed its marker.
    #[cfg(feature = "lab")]
    Lab(fleetboot::lab_cli::LabArgs),
    /// Boot-storm load generator: N emulated iPXE clients on one interface, each with its
    /// own MAC and leased address (DHCP, then script, kernel and initrd over HTTP or TFTP),
    /// or with --pxe-mtftp N PXE ROMs (DHCP, boot server discovery, boot file over PXE
    /// MTFTP). Runs only inside a lab network namespace (`ip netns exec NS fleetboot emulate
    /// ...`). Exits 0 only if every client fetched every file.
    #[cfg(feature = "lab")]
    Emulate(fleetboot::lab_cli::EmulateArgs),
}

fn tokio() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() -> Result<()> {
    // rustls warns once per connection about what a peer sent (GnuTLS clients such as
    // nbdinfo and QEMU name an IP address in SNI): any host on the boot network could fill
    // the log that way. fleetboot counts and logs failed handshakes itself; rustls's own
    // lines stay off unless RUST_LOG names rustls.
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rustls")) {
        filter = filter.add_directive("rustls=error".parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::parse().command;
    // Sockets, open files and SQLite share one descriptor limit: every role starts with
    // the most it may have, and a long-running one says how much that is.
    let long_running = matches!(
        command,
        Command::Serve { .. }
            | Command::Nbd { .. }
            | Command::Negotiate { .. }
            | Command::Files { .. }
            | Command::Master(_)
            | Command::Stream { .. }
            | Command::Agent { .. }
    );
    fleetboot::limits::raise_fd_limit(long_running);
    match command {
        Command::Serve { config } => tokio()?.block_on(serve::run_from_file(config)),
        Command::Nbd { config } => tokio()?.block_on(serve::nbd::standalone(Config::load(&config)?)),
        Command::Negotiate { config } => negotiate::boot::run(Config::load(&config)?),
        Command::Files { config } => negotiate::files::run(Config::load(&config)?),
        Command::Store { command } => store_cli::run(command),
        Command::Cache(args) => fleetboot::cache::api::run(args),
        Command::CheckConfig { config } => Config::load(&config).map(|_| ()).map_err(Into::into),
        Command::Master(args) => fleet::cli::run_master(args),
        Command::Node { command } => fleet::cli::run_node(command),
        Command::Class { command } => fleet::cli::run_class(command),
        Command::Package { command } => fleet::cli::run_package(command),
        Command::Bundle { command } => fleet::cli::run_bundle(command),
        Command::Fleet { command } => fleet::cli::run_fleet(command),
        Command::Image { command } => image_cli::run(command),
        Command::Stream { command } => stream_cmd::run_stream(command),
        Command::Agent { command } => stream_cmd::run_agent(command),
        Command::Doctor(args) => fleetboot::doctor::run(args),
        Command::Manual(args) => fleetboot::manual::generate(Cli::command(), &args.out).map(drop),
        Command::Trace { mac, config, json, limit } => fleetboot::trace::print(mac, &config, json, limit),
        Command::Token { command } => token_cli::run(command),
        Command::Audit(args) => audit_cli::run(args),
        #[cfg(feature = "lab")]
        Command::Lab(args) => fleetboot::lab_cli::lab(args),
        #[cfg(feature = "lab")]
        Command::Emulate(args) => fleetboot::lab_cli::emulate(args),
    }
}

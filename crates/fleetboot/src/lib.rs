//! fleetboot: network boot and provisioning for fleets of machines, as a library. The
//! `fleetboot` binary (`src/main.rs`) only parses its command line and calls in here; tests
//! and other programs can run the same services in-process.
//!
//! # A map of the crate
//!
//! - [`config`]: the TOML file, composed of the sections each crate owns (`[dhcp]` and
//!   `[pxe]` from `fleetboot-dhcp`, `[tftp]` from `fleetboot-tftp`, ...), validated into
//!   one [`config::Config`]. Every error names its key: `dhcp.subnet[0].lease_time: ...`.
//! - [`serve`]: `fleetboot serve`. [`serve::Server`] starts the services a config enables
//!   and says where they listen; the shells live beside it — [`serve::dhcp`] (DHCP,
//!   ProxyDHCP, port 4011), [`serve::tftp`], [`serve::http`] (files, scripts, the API),
//!   [`serve::nbd`] (network disks), [`serve::ra`] (router advertisements) — around the
//!   boot decision they all share, [`serve::shared::Shared`].
//! - [`negotiate`]: `fleetboot negotiate` and `fleetboot files`: a PXE boot server on 4011
//!   that clears multicast groups with its peers, and the multicast TFTP file server.
//! - [`stream_cmd`]: `fleetboot stream serve` and `fleetboot agent stream` (multicast disk
//!   streaming, shells in `fleetboot-streamd`).
//! - [`cache`]: `fleetboot cache`, an edge boot cache near its site's clients; [`origin`]:
//!   the boot server's side of it inside `fleetboot serve` (`[origin]`).
//! - [`fleet`]: the provisioning master (`fleetboot master`, or `[fleet]` inside `fleetboot
//!   serve`), its node agent (`fleetboot agent node`) and the `node`/`class`/`package`/
//!   `bundle`/`fleet` commands, around the sans-I/O machines of `fleetboot-fleet`.
//! - [`image_cli`]: `fleetboot image`, the disk image catalog.
//! - [`trace`]: `fleetboot trace MAC`, one client's boot from the store.
//! - [`limits`]: the open file limit every role raises at start, and the rate-limited log
//!   line every bound writes when it is hit.
//! - [`token_cli`]: `fleetboot token create|list|revoke`, the API's tokens;
//!   [`audit_cli`]: `fleetboot audit`, who changed what.
//! - [`doctor`]: `fleetboot doctor`, what operators get wrong on a boot server's host,
//!   checked and explained.
//! - [`manual`]: man pages and shell completions, generated from the command line.
//! - `lab_cli` (cargo feature `lab`, on by default): `fleetboot lab` (QEMU VMs booting from
//!   fleetboot in network namespaces) and `fleetboot emulate` (a boot storm). Nothing above
//!   depends on it; `cargo build -p fleetboot --no-default-features` leaves it out.
//!
//! # Running the services in-process
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let text = r#"
//!     data_dir = "/tmp/fleetboot-demo"
//!     [server]
//!     address = "127.0.0.1"
//!     [dhcp]
//!     mode = "off"
//!     [tftp]
//!     listen = "127.0.0.1:0"
//!     [http]
//!     listen = "127.0.0.1:0"
//! "#;
//! let config = fleetboot::config::Config::parse(text, std::path::Path::new("."))?;
//! let server = fleetboot::serve::Server::start(config).await?;
//! let http = server.local_addrs().http.expect("enabled");
//! // ... GET http://{http}/boot/52-54-00-77-00-10.ipxe ...
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The protocols themselves are sans-I/O state machines in their own crates
//! (`fleetboot-dhcp`, `fleetboot-tftp`, `fleetboot-nbd`, ...); this crate is the I/O around
//! them. `docs/ARCHITECTURE.md` says how a boot flows through it.

pub mod audit_cli;
pub mod cache;
pub mod config;
pub mod doctor;
pub mod fleet;
pub mod image_cli;
#[cfg(feature = "lab")]
pub mod lab_cli;
pub mod limits;
pub mod manual;
pub mod negotiate;
pub mod origin;
pub mod serve;
pub mod status;
pub mod store_cli;
pub mod stream_cmd;
pub mod token_cli;
pub mod trace;

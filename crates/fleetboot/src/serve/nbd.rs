//! The NBD service: catalog images as network disks, each client with its own
//! copy-on-write overlay (`fleetboot_nbd`). Export names are `IMAGE[:VERSION]` (read-only)
//! and `IMAGE[:VERSION]@<mac-hyphen>` (the client's overlay, standard or private as
//! `[nbd]` says); boot plans name them on the kernel command line.
//!
//! A client's overlay is opened only for the client ([`LeaseHolders`], i.e.
//! [`Shared::authorize_disk`]): the address holding its lease or reservation, or the bearer
//! of the disk capability its ProxyDHCP boot script carries (`IMAGE@MAC~CAPABILITY`, scope
//! [`super::shared::NBD_SCOPE`]; the capability that fetched the script opens no disk). Catalog images
//! and the export list are served to `nbd.allow`, by default the server's loopback and the
//! subnets it hands out addresses in. The server runs within `[nbd]`'s
//! connection caps and timeouts, and with `[nbd.tls]` offers (or requires) STARTTLS.

use super::shared::Shared;
use crate::config::{Config, NbdConfig};
use anyhow::{Context, Result};
use fleetboot_boot::MacAddr;
use fleetboot_nbd::access::{Access, AllowList, ClientAuthority, Decision};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// Who may open a client's overlay: the holder of its lease or reservation, or of its disk
/// capability.
pub struct LeaseHolders(pub Arc<Shared>);

impl std::fmt::Debug for LeaseHolders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseHolders")
    }
}

impl ClientAuthority for LeaseHolders {
    fn may_open(&self, peer: IpAddr, mac: MacAddr, capability: Option<&str>) -> Decision {
        match self.0.authorize_disk(mac, peer, capability) {
            Ok(_) => Decision::Allow,
            // Counted and logged (rate-limited) by the NBD server, with the reason.
            Err(refusal) => Decision::refuse(refusal.label(), refusal.to_string()),
        }
    }
}

/// Who may read catalog images and list them: `nbd.allow`, else loopback and the DHCP
/// subnets of `config`.
pub fn catalog_readers(config: &Config) -> AllowList {
    if let Some(allow) = &config.nbd.allow {
        return allow.clone();
    }
    let mut nets = fleetboot_nbd::access::loopback().nets().to_vec();
    for s in &config.dhcp.subnets {
        if let Ok(net) = ipnet::Ipv4Net::new(s.network, s.prefix_len) {
            nets.push(net.trunc().into());
        }
    }
    AllowList::new(nets)
}

/// Serves NBD on `cfg.listen` until the task is dropped; `listening` hears the bound address.
pub async fn run(
    data_dir: &Path,
    cfg: &NbdConfig,
    allow: AllowList,
    clients: Arc<dyn ClientAuthority>,
    listening: impl FnOnce(std::net::SocketAddr),
) -> Result<()> {
    let catalog =
        fleetboot_images::Catalog::open_dir(data_dir).context("opening the image catalog")?;
    let exports = fleetboot_nbd::Exports::new(catalog, cfg.exports(data_dir))
        .with_context(|| format!("creating {}", data_dir.join("overlays").display()))?;
    let _learning = crate::stream_cmd::learn_sequences(&exports);
    let tls = match &cfg.tls {
        Some(t) => Some(fleetboot_nbd::tls::Tls::load(t).context("nbd.tls")?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding nbd.listen {}", cfg.listen))?;
    listening(listener.local_addr()?);
    tracing::info!(
        listen = %cfg.listen,
        overlay = %cfg.overlay,
        block_size = cfg.block_size,
        "NBD serving the image catalog"
    );
    let options = fleetboot_nbd::ServerOptions { access: Access { allow, clients }, limits: cfg.limits.clone(), tls, send_from_files: true };
    fleetboot_nbd::serve(listener, exports, options)
        .await
        .context("NBD accept loop")
}

/// `fleetboot nbd`: only the NBD service (whatever `nbd.enabled` says), until SIGINT/SIGTERM.
pub async fn standalone(config: crate::config::Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let allow = catalog_readers(&config);
    // The leases are those of this data_dir's store (a `fleetboot serve` on this host);
    // elsewhere only reservations and capabilities let a client have its overlay.
    let store = fleetboot_store::Store::open(&config.db_path())?;
    let key = fleetboot_auth::CapabilityKey::load_or_create(&config.capability_key_path())?;
    let profiles = config.profiles.clone();
    let shared = Shared::new(config.clone(), store.clone(), Arc::new(store), profiles).with_capability_key(key);
    let clients = Arc::new(LeaseHolders(Arc::new(shared)));
    tokio::select! {
        r = run(&config.data_dir, &config.nbd, allow, clients, |_| {}) => r,
        _ = super::shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

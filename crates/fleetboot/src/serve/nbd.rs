//! The NBD service: catalog images as network disks, each client with its own
//! copy-on-write overlay (`fleetboot_nbd`). Export names are `IMAGE[:VERSION]` (read-only)
//! and `IMAGE[:VERSION]@<mac-hyphen>` (the client's overlay, standard or private as
//! `[nbd]` says); boot plans name them on the kernel command line.

use crate::config::NbdConfig;
use anyhow::{Context, Result};
use std::path::Path;

/// Serves NBD on `cfg.listen` until the task is dropped; `listening` hears the bound address.
pub async fn run(data_dir: &Path, cfg: &NbdConfig, listening: impl FnOnce(std::net::SocketAddr)) -> Result<()> {
    let catalog =
        fleetboot_images::Catalog::open_dir(data_dir).context("opening the image catalog")?;
    let exports = fleetboot_nbd::Exports::new(catalog, cfg.exports(data_dir))
        .with_context(|| format!("creating {}", data_dir.join("overlays").display()))?;
    let _learning = crate::stream_cmd::learn_sequences(&exports); // SPEC 4.3
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
    fleetboot_nbd::serve(listener, exports)
        .await
        .context("NBD accept loop")
}

/// `fleetboot nbd`: only the NBD service (whatever `nbd.enabled` says), until SIGINT/SIGTERM.
pub async fn standalone(config: crate::config::Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    tokio::select! {
        r = run(&config.data_dir, &config.nbd, |_| {}) => r,
        _ = super::shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

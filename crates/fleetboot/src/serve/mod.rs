//! `fleetboot serve`: thin tokio shells around the sans-I/O protocol crates.
//!
//! Each service owns its sockets and drives a state machine: [`dhcp`] (DHCP, ProxyDHCP,
//! PXE boot server on 4011) around `fleetboot_dhcp::Engine`, [`tftp`] around
//! `fleetboot_tftp::ReadTransfer`, [`http`] (files with Range, per-client iPXE scripts,
//! the JSON API, `/metrics`, catalog images with Range), [`nbd`] (catalog images as NBD
//! exports with per-client overlays) and [`ra`] (IPv6 router advertisements so iPXE does not
//! wait for one). They share [`shared::Shared`].
//!
//! With `[negotiate]` the negotiator of `crate::negotiate` owns port 4011 inside this
//! process and hands the DHCP engine what is not discovery for its files; with `[files]` the
//! multicast TFTP file server runs here too: one host that answers ProxyDHCP, clears
//! multicast groups with other negotiators and serves them.

pub mod dhcp;
pub mod http;
pub mod nbd;
pub mod ra;
pub mod shared;
pub mod tftp;

use crate::config::{Config, DhcpMode};
use anyhow::{Context, Result};
use fleetboot_boot::Profile;
use fleetboot_store::{Store, StoredProfile, Write};
use shared::Shared;
use std::sync::Arc;

pub async fn run(config: Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    if !config.root.is_dir() {
        tracing::warn!(root = %config.root.display(), "server.root does not exist yet; TFTP and HTTP will serve nothing");
    }
    if let (Some(t), Some(f)) = (&config.tftp, &config.files) {
        if t.listen.port() == f.rfc2090_port {
            anyhow::bail!(
                "files.rfc2090_port: port {} is [tftp]'s in fleetboot serve; give RFC 2090 another port (such as 1069)",
                f.rfc2090_port
            );
        }
    }
    let store = Store::open(&config.db_path())?;
    let profiles = sync_profiles(&store, &config.profiles).await?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let shared = Arc::new(Shared::new(config.clone(), store, profiles));

    let mut tasks = tokio::task::JoinSet::new();
    if config.dhcp.mode != DhcpMode::Off {
        let s = shared.clone();
        tasks.spawn(async move { dhcp::run(s).await.context("DHCP service") });
    }
    if let Some(tftp) = config.tftp.clone() {
        let s = shared.clone();
        tasks.spawn(async move { tftp::run(s, tftp).await.context("TFTP service") });
    }
    if let Some(listen) = config.http {
        let s = shared.clone();
        tasks.spawn(async move { http::run(s, listen, metrics).await.context("HTTP service") });
    }
    if config.nbd.enabled {
        let (data_dir, nbd) = (config.data_dir.clone(), config.nbd.clone());
        tasks.spawn(async move { nbd::run(&data_dir, &nbd).await.context("NBD service") });
    }
    if config.files.is_some() {
        // The multicast TFTP file server beside the negotiator (an all-in-one boot server).
        let c = config.clone();
        tasks.spawn(on_thread("fleetboot-files", move || crate::negotiate::files::run(c).context("multicast file server")));
    }
    if config.negotiate.is_some() && config.dhcp.mode == DhcpMode::Off {
        let c = config.clone();
        tasks.spawn(on_thread("fleetboot-negotiate", move || crate::negotiate::boot::run(c).context("negotiator")));
    }
    if config.router_advertisement {
        let iface = config.interface.clone().context("router_advertisement.enabled needs server.interface")?;
        std::thread::Builder::new().name("fleetboot-ra".into()).spawn(move || {
            if let Err(e) = ra::run(&iface) {
                tracing::error!(error = %format!("{e:#}"), "router advertisements stopped");
            }
        })?;
    }
    tracing::info!(address = %config.address, dhcp = ?config.dhcp.mode, "fleetboot serving");
    tokio::select! {
        Some(done) = tasks.join_next() => {
            done.context("service task panicked")??;
            anyhow::bail!("a service stopped unexpectedly")
        }
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// Runs a blocking service loop on its own OS thread; the future ends when it does. A
/// thread rather than `spawn_blocking`: the runtime would wait for it at shutdown forever.
pub(crate) async fn on_thread(name: &str, f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let _ = tx.send(f());
    })?;
    rx.await.unwrap_or_else(|_| Err(anyhow::anyhow!("the service thread panicked")))
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Config profiles replace their stored copies; profiles created through the API stay.
/// A profile that came from the config and is no longer in it is removed.
async fn sync_profiles(store: &Store, from_config: &[Profile]) -> Result<Vec<Profile>> {
    let mut writes = Vec::new();
    for stored in store.profiles()? {
        if stored.source == "config" && !from_config.iter().any(|p| p.name == stored.name) {
            writes.push(Write::DeleteProfile(stored.name));
        }
    }
    for p in from_config {
        writes.push(Write::UpsertProfile(StoredProfile {
            name: p.name.clone(),
            json: serde_json::to_string(p)?,
            source: "config".into(),
        }));
    }
    store.write(writes).await?;
    let mut profiles = Vec::new();
    for stored in store.profiles()? {
        match serde_json::from_str::<Profile>(&stored.json) {
            Ok(p) => profiles.push(p),
            Err(e) => tracing::error!(profile = %stored.name, error = %e, "stored profile is unreadable; skipped"),
        }
    }
    Ok(profiles)
}

/// Boot storms arrive as bursts: a deep receive queue turns them into latency instead of
/// drops. Asks for `want` bytes (forcing past `rmem_max` when running as root) and warns
/// when the kernel granted less.
pub fn grow_recv_buffer(sock: &socket2::Socket, want: usize, what: &str) {
    use std::os::fd::AsRawFd;
    let forced = i32::try_from(want).unwrap_or(i32::MAX);
    // SAFETY: setsockopt with a valid fd and a pointer to an i32 of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &forced as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let _ = sock.set_recv_buffer_size(want);
    }
    // Linux reports twice the usable size it granted.
    match sock.recv_buffer_size() {
        Ok(got) if got < want => tracing::warn!(
            what,
            wanted = want,
            got,
            "the kernel capped this socket's receive buffer (raise net.core.rmem_max); bursts may be dropped"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(what, error = %e, "cannot read the socket's receive buffer size"),
    }
}

pub fn format_ms(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ts_ms % 1000)
}

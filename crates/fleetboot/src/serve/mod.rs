//! `fleetboot serve`: thin tokio shells around the sans-I/O protocol crates.
//!
//! Each service owns its sockets and drives a state machine: [`dhcp`] (DHCP, ProxyDHCP,
//! PXE boot server on 4011) around `fleetboot_dhcp::Engine`, [`tftp`] around
//! `fleetboot_tftp::ReadTransfer`, [`http`] (files with Range, each client's own iPXE
//! script and trace, catalog images with Range), [`admin`] (the JSON API and `/metrics`
//! for operators, on a listener of its own, behind tokens, over [`tls`] when configured),
//! [`nbd`] (catalog images as NBD exports with per-client overlays) and [`ra`] (IPv6
//! router advertisements so iPXE does not wait for one). They share [`shared::Shared`].
//!
//! Port 4011 is `fleetboot_dhcp::BootServer`'s (its shell is `crate::negotiate::boot`,
//! started by [`dhcp`]); with `[negotiate]` it hands out multicast files through its
//! negotiator, and with `[files]` the multicast TFTP file server runs here too: one host
//! that answers ProxyDHCP, clears multicast groups with other negotiators and serves them.
//!
//! # In-process
//!
//! [`Server::start`] runs the services of a [`Config`] inside the caller's tokio runtime and
//! returns once every socket is bound: [`Server::local_addrs`] says where (a port 0 in the
//! config is the port the OS picked, and the URLs and addresses handed to clients use it).
//! [`Server::shutdown`] stops them; [`Server::run_until`] is what `fleetboot serve` does.
//! [`Options::lease_store`] puts something between the DHCP shell and the store's commits
//! (see [`LeaseStore`]), so a test can delay or fail them and watch what the shell sends.

pub mod accept;
pub mod bounded;
pub mod admin;
pub mod cluster;
pub mod dashboard;
pub mod dhcp;
pub mod http;
pub mod http1;
pub mod transfer_gate;
pub mod nbd;
pub mod ra;
pub mod shared;
pub mod tftp;
pub mod tls;

use crate::config::{Config, DhcpMode};
use anyhow::{Context, Result};
use fleetboot_boot::Profile;
use fleetboot_store::{Store, StoreError, StoredProfile, Write};
use shared::{Service, Shared};
use std::os::unix::fs::DirBuilderExt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Where the DHCP shell makes lease changes durable before it sends the replies that
/// depend on them. The real one is the SQLite [`Store`] (its future resolves after the
/// group commit), or on a shared store [`cluster::SharedLeases`] (resolves once the
/// database committed the binds, `Err(LeaseConflict)` when another server's client holds
/// the address). A substitute must keep the contract: resolve `Ok` only once the writes
/// would survive a crash; on `Err` the shell withholds the replies.
pub trait LeaseStore: Send + Sync + 'static {
    fn commit(&self, writes: Vec<Write>) -> Commit<'_>;
}

/// A [`LeaseStore::commit`] in progress.
pub type Commit<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

impl LeaseStore for Store {
    fn commit(&self, writes: Vec<Write>) -> Commit<'_> {
        Box::pin(self.write(writes))
    }
}

/// Builds the [`LeaseStore`] the DHCP shell uses around the server's own [`Store`].
pub type WrapLeaseStore = Box<dyn FnOnce(Store) -> Arc<dyn LeaseStore> + Send>;

/// Choices for [`Server::start_with`] that a config file does not make.
#[derive(Default)]
pub struct Options {
    /// Wraps the store lease commits go through (the server's own [`Store`] is passed in).
    pub lease_store: Option<WrapLeaseStore>,
}

/// Where each running service listens; `None` for services the config does not enable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddrs {
    /// Requests on `dhcp.port` (67).
    pub dhcp: Option<SocketAddr>,
    /// PXE boot server requests on `dhcp.pxe_port` (4011), when the engine answers them.
    pub pxe: Option<SocketAddr>,
    pub tftp: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub nbd: Option<SocketAddr>,
    /// The operators' API and `/metrics` (`admin.listen`).
    pub admin: Option<SocketAddr>,
}

/// The services of one config, running in the caller's tokio runtime.
pub struct Server {
    shared: Arc<Shared>,
    addrs: LocalAddrs,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<()>>,
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Server {
    pub async fn start(config: Config) -> Result<Server> {
        Server::start_with(config, Options::default()).await
    }

    /// Opens the store, applies the config's profiles and starts every enabled service;
    /// returns once each is listening (or with the first one's error). DHCP starts last,
    /// so the first offer already names the ports TFTP, HTTP and NBD got.
    ///
    /// On a first start it also makes the server's secrets in `data_dir` (mode 0600): the
    /// key client capabilities are made with, and an admin token for the API (see
    /// [`admin::bootstrap_token`]).
    pub async fn start_with(config: Config, options: Options) -> Result<Server> {
        // data_dir holds the store and the secrets: only its owner enters one we create.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
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
        warn_if_fds_short(&config);
        let store = cluster::open_store_waiting(&config).await?;
        // On a shared store, heard from before the profiles are read: a change another
        // server commits after that read is applied (`cluster::follow_profiles`).
        let profile_notices = store.subscribe();
        let profiles = sync_profiles(&store, &config.profiles).await?;
        let capability_key = fleetboot_auth::CapabilityKey::load_or_create(&config.capability_key_path())?;
        admin::bootstrap_token(&config, &store, "fleetboot serve").await?;
        let metrics = metrics_handle()?;
        // Servers sharing a store let it decide every lease (`cluster`); a test's
        // substitute lease store replaces that too.
        let cluster = match options.lease_store {
            Some(_) => None,
            None => cluster::lease_store(&store, &config),
        };
        let lease_store: Arc<dyn LeaseStore> = match (options.lease_store, &cluster) {
            (Some(wrap), _) => wrap(store.clone()),
            (None, Some(c)) => c.clone(),
            (None, None) => Arc::new(store.clone()),
        };
        let shared =
            Arc::new(Shared::new(config.clone(), store, lease_store, profiles).with_capability_key(capability_key));
        if let Some(c) = cluster {
            let _ = shared.cluster.set(c);
        }
        let (stop, _) = watch::channel(false);
        let mut server = Server { shared: shared.clone(), addrs: LocalAddrs::default(), stop, tasks: JoinSet::new() };

        server.spawn(process_gauges());
        if let Some(rx) = profile_notices {
            let s = shared.clone();
            server.spawn(async move {
                cluster::follow_profiles(s, rx).await;
                anyhow::bail!("the shared store's notices ended")
            });
        }
        // The provisioning master (`[fleet] enabled`): its agents' routes on the boot
        // network's HTTP listener, its operator routes behind the API's token check.
        let master = crate::fleet::service::start_in_serve(&shared).await?;
        let agent_routes = master.clone().map(crate::fleet::service::agent_routes).unwrap_or_default();
        let operator_routes = master.map(crate::fleet::service::operator_routes).unwrap_or_default();

        let mut expected = Vec::new();
        if let Some(tftp) = config.tftp.clone() {
            let s = shared.clone();
            server.spawn(async move { tftp::run(s, tftp).await.context("TFTP service") });
            expected.push(Service::Tftp);
        }
        if let Some(listen) = config.http {
            // Not cut off at the stop signal like the others: HTTP finishes its requests.
            let (s, stop) = (shared.clone(), server.stop.subscribe());
            server.tasks.spawn(async move { http::run(s, listen, agent_routes, stopped(stop)).await.context("HTTP service") });
            expected.push(Service::Http);
        }
        if config.admin.is_some() {
            let (s, stop) = (shared.clone(), server.stop.subscribe());
            server.tasks.spawn(async move {
                admin::run(s, metrics, operator_routes, stopped(stop)).await.context("API service")
            });
            expected.push(Service::Admin);
        }
        if config.nbd.enabled {
            let (data_dir, nbd, s) = (config.data_dir.clone(), config.nbd.clone(), shared.clone());
            let allow = nbd::catalog_readers(&config);
            server.spawn(async move {
                let clients = Arc::new(nbd::LeaseHolders(s.clone()));
                nbd::run(&data_dir, &nbd, allow, clients, |a| s.listening_on(Service::Nbd, a)).await.context("NBD service")
            });
            expected.push(Service::Nbd);
        }
        server.until_listening(&expected).await?;
        if let Some(origin) = config.origin.clone() {
            let origin = crate::origin::Origin::start(shared.clone(), origin)?;
            server.spawn(async move { origin.run().await.context("origin service for edge caches") });
        }
        if config.dhcp.mode != DhcpMode::Off {
            let s = shared.clone();
            server.spawn(async move { dhcp::run(s).await.context("DHCP service") });
            expected.push(Service::Dhcp);
            if config.negotiate.is_none() {
                expected.push(Service::Pxe);
            }
        }
        server.until_listening(&expected).await?;
        // The negotiator, the file server and router advertisements are blocking loops on
        // their own threads without a stop signal: they end with the process.
        if config.files.is_some() {
            // The multicast TFTP file server beside the negotiator (an all-in-one boot server).
            let c = config.clone();
            server.spawn(on_thread("fleetboot-files", move || crate::negotiate::files::run(c).context("multicast file server")));
        }
        if config.negotiate.is_some() && config.dhcp.mode == DhcpMode::Off {
            let c = config.clone();
            server.spawn(on_thread("fleetboot-negotiate", move || crate::negotiate::boot::run(c).context("negotiator")));
        }
        if config.router_advertisement {
            let iface = config.interface.clone().context("router_advertisement.enabled needs server.interface")?;
            std::thread::Builder::new().name("fleetboot-ra".into()).spawn(move || {
                if let Err(e) = ra::run(&iface) {
                    tracing::error!(error = %format!("{e:#}"), "router advertisements stopped");
                }
            })?;
        }
        tracing::info!(address = %config.address, dhcp = ?config.dhcp.mode, addrs = ?server.addrs, "fleetboot serving");
        Ok(server)
    }

    /// Runs `service` until it ends or the server stops.
    fn spawn(&mut self, service: impl Future<Output = Result<()>> + Send + 'static) {
        let stop = self.stop.subscribe();
        self.tasks.spawn(async move {
            tokio::select! {
                r = service => r,
                _ = stopped(stop) => Ok(()),
            }
        });
    }

    /// Waits until every service in `services` has reported its address; a service that
    /// ends first (it could not bind, say) is the error.
    async fn until_listening(&mut self, services: &[Service]) -> Result<()> {
        let mut listening = self.shared.listening();
        loop {
            let all = {
                let now = listening.borrow_and_update();
                services.iter().all(|s| now.contains_key(s))
            };
            if all {
                break;
            }
            tokio::select! {
                changed = listening.changed() => changed.context("the server's state is gone")?,
                Some(done) = self.tasks.join_next() => {
                    done.context("a service panicked while starting")??;
                    anyhow::bail!("a service stopped while starting");
                }
            }
        }
        let now = self.shared.listening().borrow().clone();
        self.addrs = LocalAddrs {
            dhcp: now.get(&Service::Dhcp).copied(),
            pxe: now.get(&Service::Pxe).copied(),
            tftp: now.get(&Service::Tftp).copied(),
            http: now.get(&Service::Http).copied(),
            nbd: now.get(&Service::Nbd).copied(),
            admin: now.get(&Service::Admin).copied(),
        };
        Ok(())
    }

    /// Where the services listen.
    pub fn local_addrs(&self) -> &LocalAddrs {
        &self.addrs
    }

    /// The state the services share: config, store, profiles, the boot decision.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `signal` resolves (then stops every service) or a service fails.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> Result<()> {
        tokio::select! {
            Some(done) = self.tasks.join_next() => {
                done.context("service task panicked")??;
                anyhow::bail!("a service stopped unexpectedly")
            }
            _ = signal => {
                tracing::info!("shutting down");
                self.shutdown().await
            }
        }
    }

    /// Applies a re-read config to the running services: its profiles (synced into the
    /// store like at start, each change audited as `config`) and its `[[client]]` groups
    /// take effect for the next request; leases, transfers and connections carry on.
    /// Everything else (addresses, ports, subnets, reservations, limits) is read at start
    /// only: if it changed, the report says so and the running values stay.
    pub async fn reload(&self, new: Config) -> Result<Reloaded> {
        let profiles = sync_profiles(&self.shared.store, &new.profiles).await?;
        let count = profiles.len();
        self.shared.replace_profiles_and_groups(profiles, &new.groups);
        let rest = |c: &Config| {
            let mut c = c.clone();
            c.profiles.clear();
            c.groups.clear();
            format!("{c:?}")
        };
        Ok(Reloaded { profiles: count, groups: new.groups.len(), restart_needed: rest(&self.shared.config) != rest(&new) })
    }

    /// Serves until SIGINT or SIGTERM; on SIGHUP re-reads `path` and applies it
    /// ([`Server::reload`]). A config that does not load is refused with its error and the
    /// running one stays.
    pub async fn run_reloading(mut self, path: PathBuf) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let stop = shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                Some(done) = self.tasks.join_next() => {
                    done.context("service task panicked")??;
                    anyhow::bail!("a service stopped unexpectedly")
                }
                _ = &mut stop => {
                    tracing::info!("shutting down");
                    return self.shutdown().await;
                }
                _ = hup.recv() => {
                    let loaded = Config::load(&path);
                    let result = match loaded {
                        Ok(new) => self.reload(new).await,
                        Err(e) => Err(anyhow::Error::from(e)),
                    };
                    match result {
                        Ok(r) => {
                            metrics::counter!("fleetboot_config_reloads_total", "result" => "applied").increment(1);
                            tracing::info!(path = %path.display(), profiles = r.profiles, groups = r.groups, "config reloaded: profiles and client groups apply from the next request");
                            if r.restart_needed {
                                tracing::warn!(path = %path.display(), "the config changes more than profiles and [[client]] groups: those changes take effect at the next restart");
                            }
                        }
                        Err(e) => {
                            metrics::counter!("fleetboot_config_reloads_total", "result" => "refused").increment(1);
                            tracing::error!(path = %path.display(), error = %format!("{e:#}"), "config reload refused; still running the previous config");
                        }
                    }
                }
            }
        }
    }

    /// Stops every service: listeners close, HTTP finishes the requests it has, DHCP
    /// replies already waiting for their commit are still sent, and TFTP transfers in
    /// progress run to their end on their own threads.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        while let Some(done) = self.tasks.join_next().await {
            done.context("service task panicked")??;
        }
        self.shared.replies.close();
        self.shared.replies.wait().await;
        Ok(())
    }
}

/// `fleetboot serve`: every service of `config` until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<()> {
    Server::start(config).await?.run_until(shutdown_signal()).await
}

/// Descriptors a running server may need beyond its caps: listeners, SQLite, logs.
const FD_BASE: u64 = 128;

/// Says so at start when the open file limit is below what the configured caps can use:
/// the server still runs, and what finds no descriptor is refused and logged.
fn warn_if_fds_short(config: &Config) {
    let Some(limit) = crate::limits::fd_limit() else { return };
    // A TFTP transfer holds its socket and its file.
    let tftp = config.tftp.as_ref().map_or(0, |t| 2 * t.max_transfers as u64);
    let wanted = FD_BASE + tftp;
    if limit.soft < wanted {
        tracing::warn!(
            fd_limit = limit.soft,
            wanted,
            "the open file limit is below what tftp.max_transfers can use: requests beyond it are refused \
             (and logged) until descriptors free up; raise the limit (LimitNOFILE=, ulimit -n) or lower the caps"
        );
    }
}

/// Descriptors, threads and resident memory of the process, every few seconds: what the
/// caps are there to bound.
async fn process_gauges() -> Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        if let Some(n) = crate::limits::open_fds() {
            metrics::gauge!("fleetboot_open_fds").set(n as f64);
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            for line in status.lines() {
                let value = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok());
                if line.starts_with("Threads:") {
                    if let Some(v) = value(line) {
                        metrics::gauge!("fleetboot_threads").set(v);
                    }
                } else if line.starts_with("VmRSS:") {
                    if let Some(kib) = value(line) {
                        metrics::gauge!("fleetboot_resident_bytes").set(kib * 1024.0);
                    }
                }
            }
        }
    }
}

/// `fleetboot serve --config PATH`: like [`run`], and SIGHUP (`systemctl reload`) re-reads
/// `PATH`.
pub async fn run_from_file(path: PathBuf) -> Result<()> {
    let config = Config::load(&path)?;
    Server::start(config).await?.run_reloading(path).await
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub profiles: usize,
    pub groups: usize,
    /// The config also changed settings that are read at start only.
    pub restart_needed: bool,
}

/// One Prometheus recorder per process: every server in it reports to the same one.
fn metrics_handle() -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: Mutex<Option<metrics_exporter_prometheus::PrometheusHandle>> = Mutex::new(None);
    let mut h = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if h.is_none() {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        *h = Some(handle);
    }
    Ok(h.clone().expect("set above"))
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

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Config profiles replace their stored copies; profiles created through the API stay.
/// A profile that came from the config and is no longer in it is removed. Each profile the
/// config adds, changes or removes is in the audit log, by actor `config`.
async fn sync_profiles(store: &Store, from_config: &[Profile]) -> Result<Vec<Profile>> {
    let mut writes = Vec::new();
    let stored_now = store.profiles()?;
    let audit = |action: &str, name: &str, before: Option<&str>, after: Option<&str>| {
        Write::Audit(fleetboot_store::AuditEntry {
            id: 0,
            ts_ms: shared::now_ms(),
            actor: "config".into(),
            actor_id: None,
            action: action.into(),
            target: format!("profile/{name}"),
            before: before.map(Into::into),
            after: after.map(Into::into),
            remote: None,
        })
    };
    for stored in &stored_now {
        if stored.source == "config" && !from_config.iter().any(|p| p.name == stored.name) {
            writes.push(Write::DeleteProfile(stored.name.clone()));
            writes.push(audit("profile.delete", &stored.name, Some(&stored.json), None));
        }
    }
    for p in from_config {
        let json = serde_json::to_string(p)?;
        match stored_now.iter().find(|s| s.name == p.name) {
            None => writes.push(audit("profile.create", &p.name, None, Some(&json))),
            Some(s) if s.json != json || s.source != "config" => {
                writes.push(audit("profile.update", &p.name, Some(&s.json), Some(&json)))
            }
            Some(_) => {}
        }
        writes.push(Write::UpsertProfile(StoredProfile { name: p.name.clone(), json, source: "config".into() }));
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

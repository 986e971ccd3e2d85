//! `fleetboot cache --config F`: an edge boot cache near its site's clients.
//!
//! It answers the site's boot requests over HTTP ([`http`]) and TFTP ([`tftp`]), and reads
//! of catalog images over NBD ([`nbd`], read-only), from its own store ([`objects`]), filling from the origin on a miss — one fetch per object
//! however many clients want it, every chunk checked against the manifest the origin
//! signed before anyone gets it. Two ways in:
//!
//! - **explicit**: the site's DHCP points clients at the cache (`http://CACHE/boot/start.ipxe`
//!   or TFTP `boot/<mac>.ipxe` with next-server = the cache); the origin renders their
//!   scripts with the cache's URL (`[[origin.cache]] url`);
//! - **transparent**: clients talk to the origin's address as usual; the site's gateway
//!   diverts connections to the origin's HTTP port to `cache.transparent_listen`
//!   (nftables TPROXY, see docs), where the cache answers boot files and scripts itself
//!   and passes every other request through to the origin.
//!
//! The cache asks the origin for each client's plan (script + object versions) and keeps
//! it in its image map, so boots go on from what it holds verified while the origin or
//! the WAN is down; a client that needs something it does not hold is refused with the
//! reason, in its boot trace at the cache. It reports every state change of its table to
//! the origin ([`report`]) and long-polls the origin's directives (the site's versions,
//! objects to fetch ahead and hold). [`api`]: the status API and `fleetboot cache status`.

pub mod api;
pub mod http;
pub mod keyfile;
pub mod link;
pub mod nbd;
pub mod objects;
pub mod report;
pub mod tftp;

use crate::config::Config;
use anyhow::{Context, Result};
use fleetboot_boot::MacAddr;
use fleetboot_cache::config::CacheConfig;
use fleetboot_cache::messages::{CacheCounters, ClientPlan, Directives, Message, ObjectRef};
use fleetboot_cache::ImageMap;
use fleetboot_store::{Store, TraceEvent, Write};
use link::{Link, LinkError};
use objects::{Counters, Objects, ReaderGuard};
use report::Reporter;
use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub fn now_ms() -> u64 {
    crate::serve::shared::now_ms()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The script a client gets when it cannot boot, saying why.
fn refuse(why: &str) -> String {
    format!("#!ipxe\necho fleetboot cache: {}\nexit 1\n", why.replace('\n', " "))
}

/// Where a running cache listens.
#[derive(Debug, Clone, Default)]
pub struct CacheAddrs {
    pub http: Option<SocketAddr>,
    pub tftp: Option<SocketAddr>,
    pub transparent: Option<SocketAddr>,
    pub api: Option<SocketAddr>,
    pub nbd: Option<SocketAddr>,
}

pub struct Cache {
    pub config: Config,
    pub cfg: CacheConfig,
    store: Store,
    pub link: Arc<Link>,
    pub objects: Arc<Objects>,
    map: Mutex<ImageMap>,
    /// Which client holds an address (learned from its script request).
    clients: Mutex<HashMap<Ipv4Addr, MacAddr>>,
    reporter: Arc<Reporter>,
    seq: AtomicU64,
    /// Scripts served from the origin's answer, and from the image map alone.
    pub plans_from_origin: AtomicU64,
    pub plans_from_map: AtomicU64,
    pub refusals: AtomicU64,
}

/// A cache serving in the caller's tokio runtime.
pub struct Running {
    pub cache: Arc<Cache>,
    pub addrs: CacheAddrs,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<()>>,
}

impl Running {
    /// Serves until `signal` resolves or a service fails.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            Some(done) = self.tasks.join_next() => {
                done.context("cache task panicked")??;
                anyhow::bail!("a cache service stopped unexpectedly")
            }
            _ = signal => self.shutdown().await,
        }
    }

    /// Stops every listener and task.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        Ok(())
    }
}

/// `fleetboot cache --config F`: serves until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<()> {
    start(config).await?.run_until(crate::serve::shutdown_signal()).await
}

/// Opens the cache's store and objects, binds its listeners and starts its tasks.
pub async fn start(config: Config) -> Result<Running> {
    let cfg = config.cache.clone().context("the config has no [cache] section")?;
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.db_path())?;
    let key_path = cfg.key_file.clone().unwrap_or_else(|| config.data_dir.join("cache").join("cache.key"));
    let key = keyfile::load_or_create(&key_path)?;
    tracing::info!(name = cfg.name, key = %fleetboot_cache::keys::public_hex(&key.verifying_key()), origin = %cfg.origin, "edge cache starting (list this key in the origin's [[origin.cache]])");
    let link = Arc::new(Link::new(cfg.clone(), key));
    let reporter = Arc::new(Reporter::default());
    let objects = Objects::load(
        config.data_dir.join("cache").join("objects"),
        link.clone(),
        store.clone(),
        reporter.clone(),
        cfg.max_bytes,
        cfg.memory_bytes,
        cfg.fetch_run,
    )?;
    let mut map = ImageMap::new(cfg.max_clients);
    for c in store.cache_clients()? {
        match ClientPlan::parse(c.plan.as_bytes()) {
            Ok(p) => {
                map.learn(p, c.learned_ms);
            }
            Err(e) => tracing::warn!(mac = c.mac, error = %e, "stored plan unreadable; dropped"),
        }
    }
    map.set_current(store.cache_site()?.into_iter().map(|(name, version, sha256)| ObjectRef { name, version, sha256 }).collect());
    let cache = Arc::new(Cache {
        config: config.clone(),
        cfg: cfg.clone(),
        store,
        link: link.clone(),
        objects: objects.clone(),
        map: Mutex::new(map),
        clients: Mutex::new(HashMap::new()),
        reporter: reporter.clone(),
        seq: AtomicU64::new(0),
        plans_from_origin: AtomicU64::new(0),
        plans_from_map: AtomicU64::new(0),
        refusals: AtomicU64::new(0),
    });
    let (stop, _) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut addrs = CacheAddrs::default();

    {
        let (o, l) = (objects.clone(), link.clone());
        let c = cache.clone();
        tasks.spawn(async move {
            reporter.run(l, move || o.holdings(), move || c.counters()).await;
            Ok(())
        });
    }
    {
        let c = cache.clone();
        tasks.spawn(async move {
            c.directives_loop().await;
            Ok(())
        });
    }
    if cfg.scrub_interval_s > 0 {
        let c = cache.clone();
        let every = Duration::from_secs(cfg.scrub_interval_s);
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let bad = c.objects.scrub().await;
                tracing::info!(corrupt = bad, "scrub finished");
            }
        });
    }
    if let Some(listen) = config.http {
        let l = fleetboot_net::TcpListenerBuilder::new(listen).bind_tokio().with_context(|| format!("http.listen {listen}"))?;
        addrs.http = Some(l.local_addr()?);
        tasks.spawn(http::serve(cache.clone(), l, false, stop.subscribe()));
    }
    if let Some(listen) = cfg.transparent_listen {
        let l = fleetboot_net::TcpListenerBuilder::new(listen)
            .transparent(true)
            .bind_tokio()
            .with_context(|| format!("cache.transparent_listen {listen}"))?;
        addrs.transparent = Some(l.local_addr()?);
        tasks.spawn(http::serve(cache.clone(), l, true, stop.subscribe()));
    }
    {
        let l = fleetboot_net::TcpListenerBuilder::new(cfg.api_listen).bind_tokio().with_context(|| format!("cache.api_listen {}", cfg.api_listen))?;
        addrs.api = Some(l.local_addr()?);
        tasks.spawn(api::serve(cache.clone(), l, stop.subscribe()));
    }
    if let Some(listen) = cfg.nbd_listen {
        let l = fleetboot_net::TcpListenerBuilder::new(listen).bind_tokio().with_context(|| format!("cache.nbd_listen {listen}"))?;
        addrs.nbd = Some(l.local_addr()?);
        tasks.spawn(nbd::serve(cache.clone(), l, stop.subscribe()));
    }
    if let Some(t) = config.tftp.clone() {
        let sock = tftp::bind(&cache, &t)?;
        addrs.tftp = Some(sock.local_addr()?);
        let (c, handle) = (cache.clone(), tokio::runtime::Handle::current());
        tasks.spawn(crate::serve::on_thread("fleetboot-cache-tftp", move || tftp::run(c, t, sock, handle)));
    }
    tracing::info!(name = cfg.name, ?addrs, "edge cache serving");
    Ok(Running { cache, addrs, stop, tasks })
}

impl Cache {
    pub fn counters(&self) -> CacheCounters {
        let c = &self.objects.counters;
        CacheCounters {
            hits: Counters::get(&c.hits),
            misses: Counters::get(&c.misses),
            bytes_from_origin: Counters::get(&c.bytes_from_origin),
            bytes_served: Counters::get(&c.bytes_served),
            corrupt_chunks: Counters::get(&c.corrupt_wire) + Counters::get(&c.corrupt_disk),
        }
    }

    /// Records an event in a client's boot trace (the cache's own store).
    pub fn trace(&self, mac: MacAddr, kind: &str, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::debug!(%mac, kind, %detail, "trace");
        self.store.write_later(vec![Write::Trace(TraceEvent { ts_ms: now_ms(), mac: mac.to_string(), kind: kind.into(), detail })]);
    }

    pub fn bind_ip(&self, ip: Ipv4Addr, mac: MacAddr) {
        let mut c = lock(&self.clients);
        if c.len() >= self.cfg.max_clients && !c.contains_key(&ip) {
            c.clear();
            tracing::warn!(max = self.cfg.max_clients, "address map full; cleared");
        }
        c.insert(ip, mac);
    }

    pub fn mac_of(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        lock(&self.clients).get(&ip).copied()
    }

    /// The iPXE script that asks for a client's own script (for DHCP servers that cannot
    /// name a file per client): relative, so it works whatever address the client used.
    pub fn start_script() -> String {
        "#!ipxe\nchain /boot/${mac:hexhyp}.ipxe\n".to_string()
    }

    /// A client's script: the origin's plan when it answers, else the image map's if
    /// everything it names is held verified here, else a refusal saying why.
    pub async fn script(self: &Arc<Self>, mac: MacAddr, ip: Option<Ipv4Addr>) -> String {
        if let Some(ip) = ip {
            self.bind_ip(ip, mac);
        }
        let why = match self.link.down() {
            Some(why) => why,
            None => {
                let idle = Duration::from_millis(self.cfg.origin_timeout_ms);
                match self.link.control::<ClientPlan>("GET", &format!("/cache/v1/plan/{mac}"), b"", idle).await {
                    Ok(plan) if plan.mac == mac.to_string() => return self.from_origin(mac, plan),
                    Ok(plan) => format!("the origin answered for {} instead", plan.mac),
                    Err(e) => e.to_string(),
                }
            }
        };
        let map = lock(&self.map);
        match map.offline_plan(&mac.to_string(), &why, |o| self.objects.holds(o)) {
            Ok(plan) => {
                self.plans_from_map.fetch_add(1, Ordering::Relaxed);
                self.trace(mac, "CACHE-SCRIPT", format!("from the image map ({why}): {}", describe(&plan.objects)));
                plan.script.clone()
            }
            Err(refusal) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                let text = refusal.to_string();
                tracing::warn!(%mac, reason = text, "boot refused");
                self.trace(mac, "CACHE-REFUSED", text.clone());
                refuse(&text)
            }
        }
    }

    fn from_origin(self: &Arc<Self>, mac: MacAddr, plan: ClientPlan) -> String {
        self.plans_from_origin.fetch_add(1, Ordering::Relaxed);
        self.trace(mac, "CACHE-SCRIPT", format!("from the origin: {}", describe(&plan.objects)));
        let json = serde_json::to_string(&plan).unwrap_or_default();
        let script = plan.script.clone();
        let objects = plan.objects.clone();
        if let Some(dropped) = lock(&self.map).learn(plan, now_ms()) {
            self.store.write_later(vec![Write::DeleteCacheClient(dropped)]);
        }
        self.store.write_later(vec![Write::UpsertCacheClient { mac: mac.to_string(), plan: json, learned_ms: now_ms() }]);
        // The fills start now, before the client asks for the first byte.
        let me = self.clone();
        tokio::spawn(async move {
            for o in objects {
                if let Err(e) = me.objects.open(&o, false).await {
                    tracing::warn!(name = o.name, version = o.version, error = %e, "cannot fetch an object of a plan");
                }
            }
        });
        script
    }

    /// The object a client asks for by name (`files/...`, `images/...`), at the version its
    /// plan (or the site) says, held open while it is read. `Ok((guard, hit))`.
    pub async fn object(self: &Arc<Self>, ip: Option<Ipv4Addr>, name: &str) -> Result<(ReaderGuard, bool), String> {
        self.object_at(ip, name, None).await
    }

    /// [`Cache::object`], or with `version` that exact version (an NBD export
    /// `IMAGE:VERSION`): held here, else its manifest from the origin.
    pub async fn object_at(self: &Arc<Self>, ip: Option<Ipv4Addr>, name: &str, version: Option<u64>) -> Result<(ReaderGuard, bool), String> {
        let mac = ip.and_then(|i| self.mac_of(i)).map(|m| m.to_string());
        let wanted = match version {
            Some(v) => match self.objects.slot(&(name.to_string(), v)) {
                Some(slot) => Some(slot.reference()),
                None => match self.link.down() {
                    Some(why) => return Err(format!("{name} version {v} is not held at this cache and the origin is unreachable ({why})")),
                    None => match self.link.manifest(name, Some(v)).await {
                        Ok((m, _)) => Some(ObjectRef { name: name.to_string(), version: m.version, sha256: fleetboot_cache::hash::to_hex(&m.sha256) }),
                        Err(LinkError::Status(404, why)) => return Err(format!("{name} version {v}: not found at the origin ({why})")),
                        Err(e) => return Err(format!("{name} version {v}: {e}")),
                    },
                },
            },
            None => lock(&self.map).version_for(mac.as_deref(), name).cloned(),
        };
        let wanted = match wanted {
            Some(r) => r,
            None => match self.link.down() {
                Some(why) => {
                    // No plan names it and the origin cannot be asked: the newest version
                    // held verified, if any.
                    let slot = self.objects.newest_held(name).ok_or_else(|| format!("{name} is not held at this cache and the origin is unreachable ({why})"))?;
                    slot.reference()
                }
                None => match self.link.manifest(name, None).await {
                    Ok((m, _)) => ObjectRef { name: name.to_string(), version: m.version, sha256: fleetboot_cache::hash::to_hex(&m.sha256) },
                    Err(LinkError::Status(404, why)) => return Err(format!("{name}: not found at the origin ({why})")),
                    Err(e) => return Err(format!("{name}: {e}")),
                },
            },
        };
        let hit = self.objects.holds(&wanted);
        let guard = match self.objects.open(&wanted, false).await {
            Ok(g) => g,
            Err(e) => {
                let why = match self.link.down() {
                    Some(down) => format!("{} version {} is not held verified at this cache and the origin is unreachable ({down})", wanted.name, wanted.version),
                    None => format!("{} version {}: {e}", wanted.name, wanted.version),
                };
                return Err(why);
            }
        };
        let c = &self.objects.counters;
        Counters::add(if hit { &c.hits } else { &c.misses }, 1);
        metrics::counter!("fleetboot_cache_requests_total", "result" => if hit { "hit" } else { "miss" }).increment(1);
        Ok((guard, hit))
    }

    async fn directives_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_secs(1);
        let idle = crate::origin::peer::LONG_POLL + Duration::from_millis(self.cfg.origin_timeout_ms);
        loop {
            let after = self.seq.load(Ordering::Relaxed);
            match self.link.control::<Directives>("GET", &format!("/cache/v1/directives?after={after}"), b"", idle).await {
                Ok(d) => {
                    backoff = Duration::from_secs(1);
                    self.apply(d).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "directives not received; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Follows the origin's directives: the site's versions, and objects to hold.
    pub async fn apply(self: &Arc<Self>, d: Directives) {
        self.seq.store(d.seq, Ordering::Relaxed);
        let site: Vec<(String, u64, String)> = d.current.iter().map(|r| (r.name.clone(), r.version, r.sha256.clone())).collect();
        lock(&self.map).set_current(d.current.clone());
        self.store.write_later(vec![Write::ReplaceCacheSite(site)]);
        for p in &d.prestage {
            self.objects.supersede(&p.object.name, p.object.version);
        }
        let pinned: BTreeSet<(String, u64)> = d.prestage.iter().filter(|p| p.pin).map(|p| (p.object.name.clone(), p.object.version)).collect();
        for slot in self.objects.slots() {
            if !pinned.contains(&slot.key) {
                self.objects.set_pinned(&slot.key, false);
            }
        }
        if d.prestage.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for p in d.prestage {
                match me.objects.open(&p.object, p.pin).await {
                    Ok(g) => me.objects.set_pinned(&g.slot.key, p.pin),
                    Err(e) => tracing::warn!(name = p.object.name, version = p.object.version, error = %e, "prestage failed"),
                }
            }
        });
    }

    /// What `fleetboot cache status` and `GET /api/cache` show.
    pub fn status(&self) -> serde_json::Value {
        let c = &self.objects.counters;
        let (used, capacity) = self.objects.used();
        let mut objects: Vec<serde_json::Value> = self
            .objects
            .entries()
            .into_iter()
            .map(|((name, version), e)| {
                let (held, chunks) =
                    self.objects.slot(&(name.clone(), version)).map_or((0, 0), |s| (s.held_chunks(), s.manifest.chunk_count()));
                serde_json::json!({
                    "name": name, "version": version, "sha256": fleetboot_cache::hash::to_hex(&e.sha256),
                    "size": e.size, "state": e.state, "pinned": e.pinned, "readers": e.readers,
                    "chunks": chunks, "held_chunks": held, "last_used_ms": e.last_used_ms,
                })
            })
            .collect();
        objects.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()).then(a["version"].as_u64().cmp(&b["version"].as_u64())));
        let map = lock(&self.map);
        serde_json::json!({
            "name": self.cfg.name,
            "origin": self.cfg.origin.to_string(),
            "origin_down": self.link.down(),
            "directives_seq": self.seq.load(Ordering::Relaxed),
            "used_bytes": used,
            "max_bytes": capacity,
            "hits": Counters::get(&c.hits),
            "misses": Counters::get(&c.misses),
            "bytes_from_origin": Counters::get(&c.bytes_from_origin),
            "bytes_from_origin_all": self.link.bytes_in.load(Ordering::Relaxed),
            "bytes_adopted": Counters::get(&c.bytes_adopted),
            "bytes_served": Counters::get(&c.bytes_served),
            "corrupt_chunks_wire": Counters::get(&c.corrupt_wire),
            "corrupt_chunks_disk": Counters::get(&c.corrupt_disk),
            "evictions": Counters::get(&c.evictions),
            "plans_from_origin": self.plans_from_origin.load(Ordering::Relaxed),
            "plans_from_map": self.plans_from_map.load(Ordering::Relaxed),
            "refusals": self.refusals.load(Ordering::Relaxed),
            "image_map_clients": map.len(),
            "site": map.currents().collect::<Vec<_>>(),
            "reports_pending": self.reporter.pending(),
            "reports_sent": self.reporter.sent.load(Ordering::Relaxed),
            "objects": objects,
        })
    }
}

fn describe(objects: &[ObjectRef]) -> String {
    if objects.is_empty() {
        return "no cached objects".into();
    }
    objects.iter().map(|o| format!("{} v{}", o.name, o.version)).collect::<Vec<_>>().join(", ")
}

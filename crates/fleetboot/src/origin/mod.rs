//! The origin side of edge boot caches, inside `fleetboot serve` when the config has an
//! `[origin]` section.
//!
//! The origin signs a manifest for every object version its caches ask for
//! ([`objects`]), keeps the verification table of each cache
//! ([`fleetboot_cache::OriginTable`], persisted in the store), hands each cache's clients a
//! new version only once that cache holds it verified, notices changed files (a rescan
//! every `origin.rescan_interval_s`, and at every request) and tells the caches holding a
//! stale version to fetch the new one (directives, long-polled by each cache).
//!
//! Caches talk to their own listener, `origin.listen` ([`peer`]): every request signed by a
//! configured cache, every control reply signed by the origin. The operator's view
//! (`/api/origin`, [`api`]) is mounted on the HTTP API like the rest of it.

pub mod api;
pub mod objects;
pub mod peer;

use crate::serve::shared::{now_ms, Shared};
use anyhow::{Context, Result};
use fleetboot_boot::{BootPlan, MacAddr};
use fleetboot_cache::auth::RequestVerifier;
use fleetboot_cache::config::{prestage_object, OriginCache, OriginConfig};
use fleetboot_cache::hash::to_hex;
use fleetboot_cache::keys::{public_hex, SigningKey};
use fleetboot_cache::messages::{CacheCounters, ClientPlan, Directives, ObjectRef, Prestage};
use fleetboot_cache::table::{Holding, OriginTable, State};
use fleetboot_store::{HoldingRow, Write};
use objects::Objects;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::watch;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the origin counts per cache (shown by `/api/origin`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStats {
    /// Object bytes sent (chunk fills and pushes).
    pub bytes_objects: u64,
    /// Manifest bytes sent.
    pub bytes_manifests: u64,
    /// Plans, directives and report answers sent.
    pub bytes_control: u64,
    pub requests: u64,
    /// Requests refused (signature, unknown cache, replay, skew).
    pub refused: u64,
    pub last_seen_ms: u64,
    /// What the cache last reported of itself.
    pub reported: CacheCounters,
}

/// The origin service of one `fleetboot serve`.
pub struct Origin {
    shared: Arc<Shared>,
    cfg: OriginConfig,
    key: SigningKey,
    verifier: Mutex<RequestVerifier>,
    objects: Mutex<Objects>,
    /// One hashing pass at a time (a storm's first requests wait for one read, not many).
    refreshing: tokio::sync::Mutex<()>,
    table: Mutex<OriginTable>,
    /// Objects the operator asked a cache to hold (`POST /api/origin/prestage`), pinned.
    prestaged: Mutex<HashMap<String, BTreeSet<String>>>,
    seq: watch::Sender<u64>,
    peers: Mutex<HashMap<String, PeerStats>>,
    listener: Mutex<Option<std::net::TcpListener>>,
    local: SocketAddr,
}

/// The origins running in this process, by the server they belong to (the HTTP API finds
/// its server's origin here).
fn registry() -> &'static Mutex<Vec<(Weak<Shared>, Weak<Origin>)>> {
    static R: Mutex<Vec<(Weak<Shared>, Weak<Origin>)>> = Mutex::new(Vec::new());
    &R
}

/// The origin of a running server, if its config has `[origin]`.
pub fn of(shared: &Arc<Shared>) -> Option<Arc<Origin>> {
    let mut r = lock(registry());
    r.retain(|(s, o)| s.strong_count() > 0 && o.strong_count() > 0);
    r.iter().find(|(s, _)| s.as_ptr() == Arc::as_ptr(shared)).and_then(|(_, o)| o.upgrade())
}

impl Origin {
    /// Loads (or creates) the origin key, the published versions and the caches' table,
    /// and binds `origin.listen`. [`Origin::run`] then serves.
    pub fn start(shared: Arc<Shared>, cfg: OriginConfig) -> Result<Arc<Origin>> {
        let data_dir = shared.config.data_dir.clone();
        let key_path = cfg.key_file.clone().unwrap_or_else(|| data_dir.join("origin").join("origin.key"));
        let key = crate::cache::keyfile::load_or_create(&key_path)?;
        let objects = Objects::load(&shared.store, shared.config.root.clone(), data_dir, cfg.chunk_size)?;
        let mut table = OriginTable::new(cfg.max_rows_per_cache);
        for r in shared.store.holdings()? {
            let Some(state) = State::parse(&r.state) else { continue };
            if cfg.caches.iter().any(|c| c.name == r.cache) {
                table.apply(&r.cache, Holding { name: r.name, version: r.version, sha256: r.sha256, state, changed_ms: r.changed_ms });
            }
        }
        let verifier = RequestVerifier::new(cfg.caches.iter().map(|c| (c.name.clone(), c.key)));
        let listener = std::net::TcpListener::bind(cfg.listen).with_context(|| format!("origin.listen {}", cfg.listen))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        tracing::info!(listen = %local, key = %public_hex(&key.verifying_key()), caches = cfg.caches.len(), "origin for edge caches listening (give caches this key as cache.origin_key)");
        let origin = Arc::new(Origin {
            shared: shared.clone(),
            cfg,
            key,
            verifier: Mutex::new(verifier),
            objects: Mutex::new(objects),
            refreshing: tokio::sync::Mutex::new(()),
            table: Mutex::new(table),
            prestaged: Mutex::new(HashMap::new()),
            seq: watch::Sender::new(1),
            peers: Mutex::new(HashMap::new()),
            listener: Mutex::new(Some(listener)),
            local,
        });
        lock(registry()).push((Arc::downgrade(&shared), Arc::downgrade(&origin)));
        Ok(origin)
    }

    /// Where caches reach this origin.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The key every manifest, plan and directive is signed with.
    pub fn public_key(&self) -> String {
        public_hex(&self.key.verifying_key())
    }

    /// Serves caches and rescans what they hold, until the future is dropped.
    pub async fn run(self: Arc<Self>) -> Result<()> {
        let listener = lock(&self.listener).take().context("the origin runs once")?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let rescan = {
            let me = self.clone();
            tokio::spawn(async move { me.rescan_loop().await })
        };
        // Accept errors (out of descriptors) are counted and logged at most every few seconds.
        // (`tap_io` is how axum hands a wrapped listener's peer address to the routes.)
        let listener = axum::serve::ListenerExt::tap_io(crate::serve::accept::Accepting::new(listener, "origin"), |_| {});
        let served = axum::serve(listener, peer::router(self.clone()).into_make_service_with_connect_info::<SocketAddr>()).await;
        rescan.abort();
        served.context("origin listener")
    }

    fn cache_cfg(&self, name: &str) -> Option<&OriginCache> {
        self.cfg.caches.iter().find(|c| c.name == name)
    }

    fn bump(&self) {
        self.seq.send_modify(|s| *s += 1);
    }

    fn count(&self, cache: &str, f: impl FnOnce(&mut PeerStats)) {
        let mut peers = lock(&self.peers);
        let s = peers.entry(cache.to_string()).or_default();
        s.last_seen_ms = now_ms();
        f(s);
    }

    /// Brings `name` up to date with the disk (hashing it if it changed); a new version
    /// is published (stored) and the caches holding an older one are marked stale and
    /// told to fetch it.
    pub async fn refresh(self: &Arc<Self>, name: &str) -> Result<objects::Version> {
        let _one = self.refreshing.lock().await;
        let me = self.clone();
        let n = name.to_string();
        let (v, write) = tokio::task::spawn_blocking(move || lock(&me.objects).refresh(&n, now_ms())).await??;
        if let Some(w) = write {
            self.shared.store.write(vec![w]).await?;
            let stale = lock(&self.table).supersede(name, v.version, now_ms());
            let rows: Vec<Write> = {
                let t = lock(&self.table);
                stale
                    .iter()
                    .flat_map(|c| t.of_cache(c).filter(|h| h.name == name && h.state == State::Stale).map(|h| holding_row(c, h)).collect::<Vec<_>>())
                    .map(Write::UpsertHolding)
                    .collect()
            };
            if !rows.is_empty() {
                self.shared.store.write(rows).await?;
            }
            if !stale.is_empty() {
                tracing::info!(name, version = v.version, caches = ?stale, "new version: caches holding an older one are told to fetch it");
            }
            self.bump();
        }
        Ok(v)
    }

    /// Every object a cache holds or was told to hold, checked against the disk.
    async fn rescan_loop(self: Arc<Self>) {
        let every = std::time::Duration::from_secs(self.cfg.rescan_interval_s);
        loop {
            let mut names: BTreeSet<String> =
                lock(&self.table).iter().filter(|(_, h)| h.state != State::Evicted).map(|(_, h)| h.name.clone()).collect();
            for c in &self.cfg.caches {
                names.extend(c.prestage.iter().filter_map(|p| prestage_object(p).ok()));
            }
            for set in lock(&self.prestaged).values() {
                names.extend(set.iter().cloned());
            }
            for name in names {
                if let Err(e) = self.refresh(&name).await {
                    tracing::debug!(name, error = %format!("{e:#}"), "rescan: object not available");
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// A cache's report: its table's changes (or all of it, after it started).
    async fn apply_report(&self, cache: &str, changes: Vec<Holding>, full: bool, counters: CacheCounters) -> Result<()> {
        let writes = {
            let mut t = lock(&self.table);
            if full {
                t.replace(cache, changes);
                vec![Write::ReplaceHoldings { cache: cache.to_string(), rows: t.of_cache(cache).map(|h| holding_row(cache, h)).collect() }]
            } else {
                changes
                    .into_iter()
                    .filter(|h| t.apply(cache, h.clone()))
                    .map(|h| Write::UpsertHolding(holding_row(cache, &h)))
                    .collect::<Vec<_>>()
            }
        };
        self.count(cache, |s| s.reported = counters);
        if !writes.is_empty() {
            self.shared.store.write(writes).await?;
            self.bump();
        }
        Ok(())
    }

    /// The version of `name` a client of `cache` gets now.
    fn handed(&self, cache: &str, name: &str) -> Option<ObjectRef> {
        let published = lock(&self.objects).published(name);
        let version = lock(&self.table).handed_version(cache, name, &published)?;
        let sha256 = published.into_iter().find(|p| p.version == version)?.sha256;
        Some(ObjectRef { name: name.to_string(), version, sha256 })
    }

    /// The standing orders for `cache`: its site's versions and what to fetch ahead.
    fn directives(&self, cache: &str) -> Directives {
        let pinned: BTreeSet<String> = self
            .cache_cfg(cache)
            .map(|c| c.prestage.iter().filter_map(|p| prestage_object(p).ok()).collect())
            .unwrap_or_default();
        let pinned: BTreeSet<String> = pinned.into_iter().chain(lock(&self.prestaged).get(cache).cloned().unwrap_or_default()).collect();
        let held: BTreeSet<String> =
            lock(&self.table).of_cache(cache).filter(|h| h.state != State::Evicted).map(|h| h.name.clone()).collect();
        let mut d = Directives { seq: *self.seq.borrow(), issued_ms: now_ms(), ..Default::default() };
        for name in held.union(&pinned) {
            if let Some(r) = self.handed(cache, name) {
                d.current.push(r);
            }
            let newest = {
                let o = lock(&self.objects);
                o.newest(name).filter(|v| v.path.is_some()).map(|v| ObjectRef { name: name.clone(), version: v.version, sha256: to_hex(&v.sha256) })
            };
            let Some(newest) = newest else { continue };
            let pin = pinned.contains(name);
            let has_it = lock(&self.table).get(cache, name, newest.version).is_some_and(|h| h.state == State::Verified);
            if pin || !has_it {
                d.prestage.push(Prestage { object: newest, pin });
            }
        }
        d
    }

    /// A client's plan, rendered for `cache`'s site, naming the versions its clients get.
    async fn plan(self: &Arc<Self>, cache: &str, mac: MacAddr) -> ClientPlan {
        let shared = &self.shared;
        let client = shared.identity(mac);
        let plan = shared.plan_for(&client);
        let mut ctx = shared.render_context();
        if let Some(url) = self.cache_cfg(cache).and_then(|c| c.url.clone()) {
            let host = url.trim_start_matches("http://").split([':', '/']).next().unwrap_or_default().to_string();
            ctx.files = fleetboot_boot::ipxe::FileBase { url: format!("{url}/files") };
            ctx.http_url = Some(url);
            ctx.tftp_url = Some(format!("tftp://{host}"));
        }
        let mut objects = Vec::new();
        if let Some((_, p)) = &plan {
            for name in plan_objects(p) {
                // The newest content is known before the choice is made.
                if let Err(e) = self.refresh(&name).await {
                    tracing::warn!(%mac, cache, name, error = %format!("{e:#}"), "an object of a plan is not available");
                    continue;
                }
                if let Some(r) = self.handed(cache, &name) {
                    objects.push(r);
                }
            }
        }
        let script = fleetboot_boot::ipxe::render(plan.as_ref().map(|(_, p)| p), &client, &ctx);
        let list = objects.iter().map(|o| format!("{} v{}", o.name, o.version)).collect::<Vec<_>>().join(", ");
        shared.trace(mac, "CACHE-PLAN", format!("for cache {cache}: {}", if list.is_empty() { "no cached objects".into() } else { list }));
        ClientPlan { mac: mac.to_string(), script, objects, issued_ms: now_ms() }
    }
}

fn holding_row(cache: &str, h: &Holding) -> HoldingRow {
    HoldingRow {
        cache: cache.to_string(),
        name: h.name.clone(),
        version: h.version,
        sha256: h.sha256.clone(),
        state: h.state.as_str().to_string(),
        changed_ms: h.changed_ms,
    }
}

/// The objects a boot plan's script fetches from the boot server (absolute URLs elsewhere
/// and NBD disks are not cached).
pub fn plan_objects(plan: &BootPlan) -> Vec<String> {
    let file = |p: &String| (!p.contains("://")).then(|| fleetboot_cache::name::file_object(p).ok()).flatten();
    match plan {
        BootPlan::Linux { kernel, initrd, .. } => std::iter::once(kernel).chain(initrd).filter_map(file).collect(),
        BootPlan::BootFile { path } => file(path).into_iter().collect(),
        BootPlan::Sanboot { image } => {
            let name = image.split(':').next().unwrap_or(image);
            fleetboot_cache::name::image_object(name).ok().into_iter().collect()
        }
        BootPlan::Script { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_names_its_files_and_images() {
        let linux = BootPlan::Linux {
            kernel: "vmlinuz".into(),
            initrd: vec!["/initrd.gz".into(), "http://elsewhere/x".into()],
            cmdline: String::new(),
            disk: None,
            loader: None,
        };
        assert_eq!(plan_objects(&linux), vec!["files/vmlinuz", "files/initrd.gz"]);
        assert_eq!(plan_objects(&BootPlan::Sanboot { image: "deb:3".into() }), vec!["images/deb"]);
        assert!(plan_objects(&BootPlan::Script { script: "#!ipxe".into() }).is_empty());
    }
}

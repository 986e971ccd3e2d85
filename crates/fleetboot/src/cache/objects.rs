//! The cache's object store: one slot per object version present, its bytes in a sparse
//! file filled chunk by chunk, its signed manifest beside it, and which chunks it holds.
//!
//! - **Single flight**: one fetcher per slot, whoever asks; a reader that needs a chunk not
//!   held yet points the fetcher at it and waits for it ([`Objects::chunk`]).
//! - **Verified only**: a chunk from the origin is written, then checked against the
//!   manifest; only then is it marked held and handed to readers. A chunk read back from
//!   disk is checked again (unless it is still in memory, where it was checked): a
//!   corrupted one is dropped and fetched anew, the reader waits for the good copy.
//! - **Resume**: the held chunks are saved every [`SAVE_EVERY`] bytes and at the end
//!   (after the data is synced), so a restart or a broken link costs only the chunks
//!   still missing.
//! - **Updates move only changed chunks**: a new version copies every chunk whose BLAKE3
//!   it finds in a version of the same object held here.
//! - **Bounded**: disk by `cache.max_size` (LRU eviction of unpinned objects, see
//!   [`fleetboot_cache::Index`]), memory by `cache.memory` (verified chunks being read).

use super::link::{Link, LinkError};
use super::report::Reporter;
use fleetboot_cache::hash::{to_hex, Digest};
use fleetboot_cache::index::{Entry, Key};
use fleetboot_cache::manifest::Manifest;
use fleetboot_cache::messages::ObjectRef;
use fleetboot_cache::table::{Holding, State};
use fleetboot_cache::{Fill, Index, Receipt};
use fleetboot_store::{CacheObject, Store, Write};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Bytes filled between two saves of the held-chunk map.
pub const SAVE_EVERY: u64 = 16 << 20;
/// Consecutive failed requests to the origin after which a fill stops (readers are told
/// why; the next reader or directive starts it again).
pub const MAX_REQUEST_FAILURES: u32 = 4;
/// Longest a reader waits while its object makes no progress at all.
pub const READER_STALL: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the cache counts (status, reports, metrics).
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_from_origin: AtomicU64,
    pub bytes_adopted: AtomicU64,
    pub bytes_served: AtomicU64,
    pub corrupt_wire: AtomicU64,
    pub corrupt_disk: AtomicU64,
    pub evictions: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// One object version present at the cache.
pub struct Slot {
    pub key: Key,
    pub manifest: Manifest,
    file: std::fs::File,
    paths: Paths,
    fill: Mutex<Fill>,
    progress: watch::Sender<u64>,
    fetching: AtomicBool,
    want_from: AtomicU32,
    failure: Mutex<Option<String>>,
    unsaved: AtomicU64,
}

impl Slot {
    pub fn is_complete(&self) -> bool {
        lock(&self.fill).is_complete()
    }

    pub fn held_chunks(&self) -> u32 {
        lock(&self.fill).held_chunks()
    }

    pub fn reference(&self) -> ObjectRef {
        ObjectRef { name: self.key.0.clone(), version: self.key.1, sha256: to_hex(&self.manifest.sha256) }
    }

    fn bump(&self) {
        self.progress.send_modify(|n| *n += 1);
    }
}

struct Paths {
    data: PathBuf,
    manifest: PathBuf,
    have: PathBuf,
}

/// A chunk of an object version.
type ChunkId = (Key, u32);

/// Verified chunks in memory, least recently used out first.
struct Ram {
    /// The bytes and the tick they were last used at.
    chunks: HashMap<ChunkId, (Arc<[u8]>, u64)>,
    order: BTreeMap<u64, (Key, u32)>,
    tick: u64,
    bytes: u64,
    limit: u64,
}

impl Ram {
    fn get(&mut self, key: &Key, i: u32) -> Option<Arc<[u8]>> {
        self.tick += 1;
        let tick = self.tick;
        let (data, at) = self.chunks.get_mut(&(key.clone(), i))?;
        self.order.remove(at);
        *at = tick;
        self.order.insert(tick, (key.clone(), i));
        Some(data.clone())
    }

    fn put(&mut self, key: &Key, i: u32, data: Arc<[u8]>) {
        self.remove(key, i);
        self.tick += 1;
        self.bytes += data.len() as u64;
        self.chunks.insert((key.clone(), i), (data, self.tick));
        self.order.insert(self.tick, (key.clone(), i));
        while self.bytes > self.limit {
            let Some((_, k)) = self.order.pop_first() else { break };
            if let Some((d, _)) = self.chunks.remove(&k) {
                self.bytes -= d.len() as u64;
            }
        }
    }

    fn remove(&mut self, key: &Key, i: u32) {
        if let Some((d, at)) = self.chunks.remove(&(key.clone(), i)) {
            self.order.remove(&at);
            self.bytes -= d.len() as u64;
        }
    }

    fn forget(&mut self, key: &Key) {
        let gone: Vec<u32> = self.chunks.keys().filter(|(k, _)| k == key).map(|(_, i)| *i).collect();
        for i in gone {
            self.remove(key, i);
        }
    }
}

/// Why an object cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Origin(#[from] LinkError),
    #[error("{0}")]
    NoRoom(#[from] fleetboot_cache::index::NoRoom),
    #[error("the origin's manifest for {name} has SHA-256 {got}, the plan says {want}")]
    Mismatch { name: String, got: String, want: String },
    #[error("{0}")]
    Io(String),
}

/// A reader's hold on a slot: it is not evicted while held.
pub struct ReaderGuard {
    objects: Arc<Objects>,
    pub slot: Arc<Slot>,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        lock(&self.objects.inner).index.close_reader(&self.slot.key);
    }
}

struct Inner {
    index: Index,
    slots: HashMap<Key, Arc<Slot>>,
}

pub struct Objects {
    dir: PathBuf,
    link: Arc<Link>,
    store: Store,
    reporter: Arc<Reporter>,
    inner: Mutex<Inner>,
    opening: tokio::sync::Mutex<()>,
    ram: Mutex<Ram>,
    pub counters: Counters,
    fetch_run: u64,
}

fn name_hash(name: &str) -> String {
    to_hex(&fleetboot_cache::hash::sha256(name.as_bytes())[..16])
}

fn paths(dir: &std::path::Path, key: &Key) -> Paths {
    let base = format!("{}-v{}", name_hash(&key.0), key.1);
    Paths {
        data: dir.join(format!("{base}.data")),
        manifest: dir.join(format!("{base}.manifest")),
        have: dir.join(format!("{base}.have")),
    }
}

fn read_have(path: &std::path::Path) -> Vec<u64> {
    std::fs::read(path)
        .map(|b| b.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes"))).collect())
        .unwrap_or_default()
}

impl Objects {
    /// Opens the store under `dir`, restoring every object the cache's table lists whose
    /// manifest still verifies; objects beyond `max_bytes` are evicted.
    pub fn load(
        dir: PathBuf,
        link: Arc<Link>,
        store: Store,
        reporter: Arc<Reporter>,
        max_bytes: u64,
        memory: u64,
        fetch_run: u64,
    ) -> anyhow::Result<Arc<Objects>> {
        std::fs::create_dir_all(&dir)?;
        let objects = Arc::new(Objects {
            dir: dir.clone(),
            link: link.clone(),
            store: store.clone(),
            reporter,
            inner: Mutex::new(Inner { index: Index::new(max_bytes), slots: HashMap::new() }),
            opening: tokio::sync::Mutex::new(()),
            ram: Mutex::new(Ram { chunks: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0, limit: memory }),
            counters: Counters::default(),
            fetch_run,
        });
        let origin_key = link.config().origin_key;
        for row in store.cache_objects()? {
            let key = (row.name.clone(), row.version);
            if matches!(State::parse(&row.state), None | Some(State::Evicted)) {
                continue;
            }
            let p = paths(&dir, &key);
            let restored = std::fs::read(&p.manifest)
                .ok()
                .and_then(|b| Manifest::decode(&b, &origin_key).ok())
                .filter(|m| m.name == row.name && m.version == row.version && to_hex(&m.sha256) == row.sha256)
                .and_then(|m| std::fs::OpenOptions::new().read(true).write(true).open(&p.data).ok().map(|f| (m, f)));
            let Some((manifest, file)) = restored else {
                tracing::warn!(name = row.name, version = row.version, "object in the table but not usable on disk; dropped");
                objects.remove_files(&key);
                store.write_later(vec![Write::UpsertCacheObject(CacheObject { state: "evicted".into(), ..row })]);
                continue;
            };
            let fill = Fill::resume(manifest.clone(), &read_have(&p.have));
            let mut state = State::parse(&row.state).unwrap_or(State::Pending);
            if state.is_held() && !fill.is_complete() {
                state = State::Pending;
            }
            let entry = Entry {
                sha256: manifest.sha256,
                size: manifest.size,
                state,
                pinned: row.pinned,
                last_used_ms: row.last_used_ms,
                changed_ms: row.changed_ms,
                readers: 0,
                filling: false,
            };
            let slot = Arc::new(Slot {
                key: key.clone(),
                manifest,
                file,
                paths: p,
                fill: Mutex::new(fill),
                progress: watch::Sender::new(0),
                fetching: AtomicBool::new(false),
                want_from: AtomicU32::new(0),
                failure: Mutex::new(None),
                unsaved: AtomicU64::new(0),
            });
            let mut inner = lock(&objects.inner);
            inner.index.restore(key.clone(), entry);
            inner.slots.insert(key, slot);
        }
        let over = lock(&objects.inner).index.over_capacity();
        for k in over {
            objects.evict(&k);
        }
        Ok(objects)
    }

    fn remove_files(&self, key: &Key) {
        let p = paths(&self.dir, key);
        for f in [p.data, p.manifest, p.have] {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Records a change of the table: in the store, and to the origin.
    fn changed(&self, h: Holding) {
        let row = {
            let inner = lock(&self.inner);
            let e = inner.index.get(&(h.name.clone(), h.version));
            CacheObject {
                name: h.name.clone(),
                version: h.version,
                sha256: h.sha256.clone(),
                size: e.map_or(0, |e| e.size),
                state: h.state.as_str().into(),
                pinned: e.is_some_and(|e| e.pinned),
                last_used_ms: e.map_or(0, |e| e.last_used_ms),
                changed_ms: h.changed_ms,
            }
        };
        let mut writes = vec![Write::UpsertCacheObject(row)];
        if h.state == State::Evicted {
            writes.push(Write::TrimEvictedCacheObjects { keep: 10_000 });
        }
        self.store.write_later(writes);
        self.reporter.push(h);
    }

    fn evict(&self, key: &Key) {
        let (row, slot) = {
            let mut inner = lock(&self.inner);
            (inner.index.evict(key, super::now_ms()), inner.slots.remove(key))
        };
        if let Some(slot) = slot {
            lock(&self.ram).forget(&slot.key);
            *lock(&slot.failure) = Some("evicted".into());
            slot.bump();
        }
        self.remove_files(key);
        if let Some(row) = row {
            Counters::add(&self.counters.evictions, 1);
            tracing::info!(name = key.0, version = key.1, "evicted");
            self.changed(row);
        }
    }

    /// The slot of an object version, if present.
    pub fn slot(&self, key: &Key) -> Option<Arc<Slot>> {
        lock(&self.inner).slots.get(key).cloned()
    }

    /// Every slot present.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.inner).slots.values().cloned().collect()
    }

    /// The newest version of `name` held verified here (a boot while the origin is down).
    pub fn newest_held(&self, name: &str) -> Option<Arc<Slot>> {
        let inner = lock(&self.inner);
        let (v, _) = inner.index.versions(name).find(|(_, e)| e.state.is_held())?;
        inner.slots.get(&(name.to_string(), v)).cloned()
    }

    /// Whether this exact version is held verified.
    pub fn holds(&self, r: &ObjectRef) -> bool {
        let inner = lock(&self.inner);
        inner.index.get(&(r.name.clone(), r.version)).is_some_and(|e| e.state.is_held() && Some(e.sha256) == r.digest())
    }

    /// The table, for status and full reports.
    pub fn holdings(&self) -> Vec<Holding> {
        lock(&self.inner).index.holdings()
    }

    /// (key, entry) of everything present, for status.
    pub fn entries(&self) -> Vec<(Key, Entry)> {
        lock(&self.inner).index.iter().map(|(k, e)| (k.clone(), e.clone())).collect()
    }

    pub fn used(&self) -> (u64, u64) {
        let inner = lock(&self.inner);
        (inner.index.used(), inner.index.capacity())
    }

    pub fn set_pinned(&self, key: &Key, pinned: bool) {
        let changed = {
            let mut inner = lock(&self.inner);
            let was = inner.index.get(key).map(|e| e.pinned);
            inner.index.set_pinned(key, pinned);
            was.is_some_and(|w| w != pinned)
        };
        if changed {
            if let Some(h) = lock(&self.inner).index.holding(key) {
                self.changed(h);
            }
        }
    }

    /// Versions of `name` older than `version` that are held become stale.
    pub fn supersede(&self, name: &str, version: u64) {
        let rows: Vec<Holding> = {
            let mut inner = lock(&self.inner);
            let older: Vec<u64> = inner.index.versions(name).filter(|(v, e)| *v < version && e.state == State::Verified).map(|(v, _)| v).collect();
            older.into_iter().filter_map(|v| inner.index.set_state(&(name.to_string(), v), State::Stale, super::now_ms())).collect()
        };
        for r in rows {
            self.changed(r);
        }
    }

    /// The slot for `r` (fetching its manifest and reserving room if it is not present),
    /// held open for a reader. The fill starts if anything is missing.
    pub async fn open(self: &Arc<Self>, r: &ObjectRef, pin: bool) -> Result<ReaderGuard, OpenError> {
        let key = (r.name.clone(), r.version);
        if let Some(g) = self.guard(&key) {
            self.ensure_fetch(&g.slot);
            return Ok(g);
        }
        let _one = self.opening.lock().await;
        if let Some(g) = self.guard(&key) {
            self.ensure_fetch(&g.slot);
            return Ok(g);
        }
        let (manifest, wire) = self.link.manifest(&r.name, Some(r.version)).await?;
        let got = to_hex(&manifest.sha256);
        if got != r.sha256 {
            return Err(OpenError::Mismatch { name: r.name.clone(), got, want: r.sha256.clone() });
        }
        let victims = lock(&self.inner).index.room_for(manifest.size)?;
        for v in victims {
            self.evict(&v);
        }
        let p = paths(&self.dir, &key);
        let io = |e: std::io::Error| OpenError::Io(format!("{}: {e}", p.data.display()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p.data).map_err(io)?;
        file.set_len(manifest.size).map_err(io)?;
        let _ = std::fs::remove_file(&p.have);
        std::fs::write(&p.manifest, &wire).map_err(io)?;
        let slot = Arc::new(Slot {
            key: key.clone(),
            manifest: manifest.clone(),
            file,
            paths: p,
            fill: Mutex::new(Fill::new(manifest.clone())),
            progress: watch::Sender::new(0),
            fetching: AtomicBool::new(false),
            want_from: AtomicU32::new(0),
            failure: Mutex::new(None),
            unsaved: AtomicU64::new(0),
        });
        let row = {
            let mut inner = lock(&self.inner);
            let row = inner.index.insert(key.clone(), manifest.sha256, manifest.size, pin, super::now_ms());
            inner.slots.insert(key.clone(), slot.clone());
            row
        };
        tracing::info!(name = key.0, version = key.1, size = manifest.size, chunks = manifest.chunk_count(), "fill started");
        self.changed(row);
        self.adopt_from_older(&slot);
        let g = self.guard(&key).ok_or_else(|| OpenError::Io("evicted while opening".into()))?;
        if slot.is_complete() {
            self.finished(&slot);
        } else {
            self.ensure_fetch(&slot);
        }
        Ok(g)
    }

    fn guard(self: &Arc<Self>, key: &Key) -> Option<ReaderGuard> {
        let mut inner = lock(&self.inner);
        let slot = inner.slots.get(key)?.clone();
        inner.index.open_reader(key);
        inner.index.touch(key, super::now_ms());
        Some(ReaderGuard { objects: self.clone(), slot })
    }

    /// Copies every chunk another version of the same object holds with the same BLAKE3.
    fn adopt_from_older(&self, slot: &Arc<Slot>) {
        let others: Vec<Arc<Slot>> = {
            let inner = lock(&self.inner);
            inner.slots.values().filter(|s| s.key.0 == slot.key.0 && s.key != slot.key).cloned().collect()
        };
        let mut by_hash: HashMap<Digest, (Arc<Slot>, u32)> = HashMap::new();
        for o in &others {
            let f = lock(&o.fill);
            for (i, h) in o.manifest.chunks.iter().enumerate() {
                if f.has(i as u32) {
                    by_hash.entry(*h).or_insert((o.clone(), i as u32));
                }
            }
        }
        if by_hash.is_empty() {
            return;
        }
        let candidates = lock(&slot.fill).adoptable(|h| by_hash.get(h).cloned());
        let mut adopted = 0u64;
        for (i, (src, j)) in candidates {
            let Ok(data) = self.read_back(&src, j) else { continue };
            let at = slot.manifest.chunk_range(i).start;
            if slot.file.write_all_at(&data, at).is_err() {
                continue;
            }
            if lock(&slot.fill).adopt(i, &data) {
                adopted += data.len() as u64;
            }
        }
        if adopted > 0 {
            Counters::add(&self.counters.bytes_adopted, adopted);
            self.save_have(slot);
            tracing::info!(name = slot.key.0, version = slot.key.1, bytes = adopted, "unchanged chunks copied from the version held here");
        }
    }

    /// Starts the slot's fetcher unless it runs or there is nothing to fetch.
    pub fn ensure_fetch(self: &Arc<Self>, slot: &Arc<Slot>) {
        if slot.is_complete() || slot.fetching.swap(true, Ordering::AcqRel) {
            return;
        }
        *lock(&slot.failure) = None;
        lock(&slot.fill).retry();
        lock(&self.inner).index.set_filling(&slot.key, true);
        let (me, slot) = (self.clone(), slot.clone());
        tokio::spawn(async move { me.fetch(slot).await });
    }

    async fn fetch(self: Arc<Self>, slot: Arc<Slot>) {
        let chunk = u64::from(slot.manifest.chunk_size);
        let run = u32::try_from((self.fetch_run / chunk).max(1)).unwrap_or(u32::MAX);
        let mut failures = 0u32;
        let mut why = None;
        let mut ended_idle = false;
        loop {
            let next = lock(&slot.fill).next_request(slot.want_from.load(Ordering::Relaxed), run);
            let Some(range) = next else {
                ended_idle = true;
                break;
            };
            // Progress is what this request brought, not the count held: readers drop
            // chunks that fail their read-back check while a request runs.
            let before = lock(&slot.fill).stats().chunks_fetched;
            match self.fetch_range(&slot, range.clone()).await {
                Ok(()) => {}
                Err(e) => {
                    lock(&slot.fill).abandon(range);
                    tracing::warn!(name = slot.key.0, version = slot.key.1, error = %e, "fill request failed");
                    why = Some(e.to_string());
                }
            }
            if lock(&slot.fill).stats().chunks_fetched > before {
                failures = 0;
            } else {
                failures += 1;
                if failures >= MAX_REQUEST_FAILURES {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250 << failures.min(5))).await;
            }
            if lock(&self.inner).slots.get(&slot.key).is_none_or(|s| !Arc::ptr_eq(s, &slot)) {
                return; // evicted meanwhile
            }
        }
        slot.fetching.store(false, Ordering::Release);
        lock(&self.inner).index.set_filling(&slot.key, false);
        self.save_have(&slot);
        let (complete, failed) = {
            let f = lock(&slot.fill);
            (f.is_complete(), f.has_failed())
        };
        if complete {
            self.finished(&slot);
        } else if ended_idle && !failed {
            // Nothing was left to ask for when the loop ended, yet a chunk is missing: a
            // reader dropped one that failed its read-back check and found this fetcher
            // still running. Fetch it rather than report the fill as stopped.
            self.ensure_fetch(&slot);
        } else {
            let reason = if failed {
                format!("{} version {}: chunks kept failing verification (the origin's content changed, or the link corrupts)", slot.key.0, slot.key.1)
            } else {
                format!("{} version {}: {}", slot.key.0, slot.key.1, why.unwrap_or_else(|| "the fill stopped".into()))
            };
            tracing::warn!(reason, "fill stopped");
            *lock(&slot.failure) = Some(reason);
        }
        slot.bump();
    }

    async fn fetch_range(&self, slot: &Arc<Slot>, range: std::ops::Range<u32>) -> Result<(), LinkError> {
        let m = &slot.manifest;
        let (start, end) = (m.chunk_range(range.start).start, m.chunk_range(range.end - 1).end - 1);
        let mut r = self.link.blob(&to_hex(&m.sha256), start, end).await?;
        let mut buf = vec![0u8; m.chunk_size as usize];
        for i in range.clone() {
            let len = m.chunk_len(i);
            if let Err(e) = r.read_exact(&mut buf[..len]).await {
                lock(&slot.fill).abandon(i..range.end);
                return Err(e);
            }
            self.link.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
            Counters::add(&self.counters.bytes_from_origin, len as u64);
            // Written before it is checked and marked: a reader only ever reads chunks
            // marked held, and those are on disk by then.
            let data = &buf[..len];
            if let Err(e) = slot.file.write_all_at(data, m.chunk_range(i).start) {
                lock(&slot.fill).abandon(i..range.end);
                return Err(LinkError::Invalid(format!("writing {}: {e}", slot.paths.data.display())));
            }
            let receipt = lock(&slot.fill).receive(i, data);
            match receipt {
                Receipt::Verified => {
                    lock(&self.ram).put(&slot.key, i, Arc::from(data));
                    if slot.unsaved.fetch_add(len as u64, Ordering::Relaxed) + len as u64 >= SAVE_EVERY {
                        self.save_have(slot);
                    }
                    slot.bump();
                }
                Receipt::Corrupt { attempts } => {
                    Counters::add(&self.counters.corrupt_wire, 1);
                    metrics::counter!("fleetboot_cache_corrupt_chunks_total", "where" => "wire").increment(1);
                    tracing::warn!(name = slot.key.0, version = slot.key.1, chunk = i, attempts, "a chunk from the origin failed verification; asked for again");
                }
                Receipt::Failed => {
                    Counters::add(&self.counters.corrupt_wire, 1);
                    metrics::counter!("fleetboot_cache_corrupt_chunks_total", "where" => "wire").increment(1);
                    lock(&slot.fill).abandon(i + 1..range.end);
                    return Ok(());
                }
                Receipt::Duplicate => {}
            }
        }
        Ok(())
    }

    /// Syncs the data and saves which chunks are held (never claims a chunk not on disk).
    fn save_have(&self, slot: &Slot) {
        slot.unsaved.store(0, Ordering::Relaxed);
        if let Err(e) = slot.file.sync_data() {
            tracing::warn!(path = %slot.paths.data.display(), error = %e, "sync failed; progress not saved");
            return;
        }
        let words: Vec<u8> = lock(&slot.fill).held_words().iter().flat_map(|w| w.to_le_bytes()).collect();
        let tmp = slot.paths.have.with_extension("have.tmp");
        if std::fs::write(&tmp, &words).and_then(|_| std::fs::rename(&tmp, &slot.paths.have)).is_err() {
            tracing::warn!(path = %slot.paths.have.display(), "could not save the held chunks");
        }
    }

    fn finished(&self, slot: &Slot) {
        self.save_have(slot);
        let row = lock(&self.inner).index.set_state(&slot.key, State::Verified, super::now_ms());
        if let Some(row) = row {
            tracing::info!(name = slot.key.0, version = slot.key.1, sha256 = %to_hex(&slot.manifest.sha256), "verified: every chunk matches the signed manifest");
            self.changed(row);
        }
    }

    /// Chunk `i` of `slot`, verified: from memory, else from disk (checked again), else
    /// once the fill brings it.
    pub async fn chunk(self: &Arc<Self>, slot: &Arc<Slot>, i: u32) -> Result<Arc<[u8]>, String> {
        let mut progress = slot.progress.subscribe();
        loop {
            if lock(&slot.fill).has(i) {
                if let Some(c) = lock(&self.ram).get(&slot.key, i) {
                    return Ok(c);
                }
                match self.read_back(slot, i) {
                    Ok(c) => {
                        lock(&self.ram).put(&slot.key, i, c.clone());
                        return Ok(c);
                    }
                    Err(ReadBack::Corrupt | ReadBack::Missing) => {}
                    Err(ReadBack::Io(e)) => return Err(e),
                }
            }
            if let Some(why) = lock(&slot.failure).clone() {
                return Err(why);
            }
            slot.want_from.store(i, Ordering::Relaxed);
            self.ensure_fetch(slot);
            match tokio::time::timeout(READER_STALL, progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("the object went away".into()),
                Err(_) => return Err(format!("{} version {}: no progress in {READER_STALL:?}", slot.key.0, slot.key.1)),
            }
        }
    }

    /// Reads chunk `i` from disk and checks it; a corrupted chunk is dropped (and will be
    /// fetched again), the object goes back to `pending`.
    ///
    /// Read and checked under the fill's lock: a chunk marked held is on disk in full (the
    /// fetcher writes a chunk before it marks it), so a bad read means bad bytes on disk,
    /// not a chunk being re-fetched that another reader already dropped.
    fn read_back(&self, slot: &Slot, i: u32) -> Result<Arc<[u8]>, ReadBack> {
        let len = slot.manifest.chunk_len(i);
        let mut buf = vec![0u8; len];
        {
            let mut fill = lock(&slot.fill);
            if !fill.has(i) {
                return Err(ReadBack::Missing); // dropped meanwhile; the fill brings it again
            }
            slot.file
                .read_exact_at(&mut buf, slot.manifest.chunk_range(i).start)
                .map_err(|e| ReadBack::Io(format!("{}: {e}", slot.paths.data.display())))?;
            if slot.manifest.check_chunk(i, &buf) {
                return Ok(Arc::from(buf));
            }
            fill.invalidate(i);
        }
        Counters::add(&self.counters.corrupt_disk, 1);
        metrics::counter!("fleetboot_cache_corrupt_chunks_total", "where" => "disk").increment(1);
        tracing::warn!(name = slot.key.0, version = slot.key.1, chunk = i, "a chunk read back from disk failed verification; fetched again");
        lock(&self.ram).remove(&slot.key, i);
        let row = lock(&self.inner).index.set_state(&slot.key, State::Pending, super::now_ms());
        if let Some(row) = row {
            self.changed(row);
        }
        Err(ReadBack::Corrupt)
    }

    /// Reads every held chunk of every object back from disk (not from memory) and checks
    /// it; corrupted chunks are fetched again. Returns how many were corrupt.
    pub async fn scrub(self: &Arc<Self>) -> u64 {
        let mut bad = 0;
        for slot in self.slots() {
            let held: Vec<u32> = {
                let f = lock(&slot.fill);
                (0..slot.manifest.chunk_count()).filter(|&i| f.has(i)).collect()
            };
            for i in held {
                if matches!(self.read_back(&slot, i), Err(ReadBack::Corrupt)) {
                    bad += 1;
                }
                tokio::task::yield_now().await;
            }
            if !slot.is_complete() {
                self.ensure_fetch(&slot);
            }
        }
        bad
    }
}

enum ReadBack {
    Corrupt,
    /// Not held (any more): another reader found it bad first.
    Missing,
    Io(String),
}

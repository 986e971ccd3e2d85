//! Several `fleetboot serve` answering DHCP from one shared (PostgreSQL) store.
//!
//! **Who answers whom.** Every server heartbeats its row in the store (`[store]
//! heartbeat_ms`) and reads back the servers heard from within `peer_timeout_ms`. A client
//! belongs to one live server, chosen by rendezvous hashing of its MAC over the live
//! names — Kea's HA load-balancing, with the split decided by who is alive rather than
//! configured. A message that names a server (option 54: a REQUEST after an OFFER, a
//! RELEASE, a DECLINE) or comes from a client that has an address (ciaddr: a renewal)
//! goes to the engine, which ignores what names another server; a message that names none
//! (DISCOVER, INIT-REBOOT) is answered by the client's owner only — or by anyone once the
//! client has been trying for [`TAKEOVER_SECS`] (its `secs` field), RFC 3074's way to
//! serve the clients of a server that is alive for the store but not for them. A server
//! that dies stops heartbeating: within `peer_timeout_ms` plus one heartbeat the others
//! drop it from the live set and its clients hash to them (only its clients move).
//!
//! **Who gets which address** is the store's decision ([`SharedLeases`], a
//! [`LeaseStore`]): a bind commits only if the address is free or already the client's;
//! the loser's ACK is withheld (the engine's persist-before-send rule) and its engine
//! learns who holds the address, so the client's retry is NAKed and it starts over. Each
//! engine also takes new addresses from its own share of the pool first
//! (`fleetboot_dhcp::leases::Share`: slot = its index among the live servers), so two
//! servers rarely want the same one.
//!
//! **Seeing each other's changes.** Lease changes and joins/leaves are `NOTIFY`ed in the
//! transaction that makes them; each server applies the others' to its engine's lease
//! table as they commit. After the listener reconnects (a notice may have been missed) or
//! when this server falls behind, the whole lease table is read again.
//!
//! **Boot profiles** ([`follow_profiles`]) are the other state a server keeps in memory
//! that another server can change (through its API, or a reloaded config): a profile
//! write `NOTIFY`s the names it changed in its transaction, and every server — DHCP or
//! not — reads those rows again once the notice arrives (so the row is there), its own
//! notices included (a read after its own commit settles a race with another server's
//! change of the same profile). Notices heard together are read together; more than
//! [`MAX_PENDING_PROFILES`] names, a lost notice or a reconnected listener mean every
//! profile is read again. API tokens and their revocations, the audit log and the lease
//! rows the HTTP and NBD services check are read from the store at each request, so they
//! need no notice.

use super::dhcp::from_record;
use super::shared::Shared;
use super::{Commit, LeaseStore};
use fleetboot_boot::MacAddr;
use fleetboot_dhcp::leases::Share;
use fleetboot_dhcp::{Engine, Lease};
use fleetboot_store::config::Liveness;
use fleetboot_store::{LeaseCommit, NoticeKind, Store, StoreError, Write};
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

/// A client whose `secs` field reaches this is answered by any server: its owner may be
/// alive for the store but unreachable for the client (RFC 3074's `secs` threshold).
pub const TAKEOVER_SECS: u16 = 10;

type Shell = Mutex<Engine<Arc<Shared>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// FNV-1a, then a finaliser: stable across builds and hosts (every server must compute
/// the same owner for a client).
fn score(server: &str, mac: &[u8; 6]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in server.bytes().chain([0u8]).chain(mac.iter().copied()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The live server a client belongs to (rendezvous hashing: when a server leaves, only its
/// own clients move).
pub fn owner<'a>(live: &'a [String], mac: &[u8; 6]) -> Option<&'a str> {
    live.iter().max_by_key(|s| (score(s, mac), s.as_str())).map(String::as_str)
}

/// What the load-balancing filter needs of a request, read straight from its bytes (the
/// engine parses it properly afterwards; anything odd is let through for it to judge).
#[derive(Debug, PartialEq, Eq)]
struct Peek {
    mac: [u8; 6],
    secs: u16,
    has_address: bool,
    names_a_server: bool,
}

fn peek(b: &[u8]) -> Option<Peek> {
    if b.len() < 240 || b[0] != 1 || b[1] != 1 || b[2] != 6 || b[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&b[28..34]);
    let secs = u16::from_be_bytes([b[8], b[9]]);
    let has_address = b[12..16] != [0, 0, 0, 0];
    let mut i = 240;
    let mut names_a_server = false;
    while i < b.len() {
        match b[i] {
            0 => i += 1,
            255 => break,
            code => {
                let len = *b.get(i + 1)? as usize;
                if code == 54 {
                    names_a_server = true;
                }
                i += 2 + len;
            }
        }
    }
    Some(Peek { mac, secs, has_address, names_a_server })
}

/// The DHCP servers on a shared store and the leases they decide together; the
/// [`LeaseStore`] of a DHCP shell on such a store.
pub struct SharedLeases {
    store: Store,
    name: String,
    liveness: Liveness,
    /// The live servers, sorted by name (this one included once it has heartbeated).
    live: RwLock<Vec<String>>,
    engine: OnceLock<Weak<Shell>>,
    shared: OnceLock<Weak<Shared>>,
    /// Wakes the membership loop early (a server joined or left).
    membership_changed: tokio::sync::Notify,
}

impl SharedLeases {
    pub fn new(store: Store, name: String, liveness: Liveness) -> Arc<SharedLeases> {
        Arc::new(SharedLeases {
            live: RwLock::new(vec![name.clone()]),
            store,
            name,
            liveness,
            engine: OnceLock::new(),
            shared: OnceLock::new(),
            membership_changed: tokio::sync::Notify::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live servers as last heard, sorted.
    pub fn live(&self) -> Vec<String> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this server answers this datagram (see the module documentation).
    pub fn answers(&self, bytes: &[u8]) -> bool {
        let Some(p) = peek(bytes) else { return true };
        if p.names_a_server || p.has_address || p.secs >= TAKEOVER_SECS {
            return true;
        }
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        if live.len() <= 1 {
            return true;
        }
        let mine = owner(&live, &p.mac) == Some(self.name.as_str());
        if !mine {
            metrics::counter!("fleetboot_dhcp_not_ours_total").increment(1);
        }
        mine
    }

    fn engine(&self) -> Option<Arc<Shell>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.get().and_then(Weak::upgrade)
    }

    /// The store's view of an address, into this server's engine.
    fn learn(&self, engine: &mut Engine<Arc<Shared>>, lease: Lease) {
        if let Some(s) = self.shared() {
            s.bind_ip(lease.ip, lease.mac);
        }
        engine.load_lease(lease);
    }

    fn forget(&self, engine: &mut Engine<Arc<Shared>>, ip: Ipv4Addr, mac: MacAddr) {
        if engine.forget_lease(ip, mac) {
            if let Some(s) = self.shared() {
                s.unbind_ip(ip);
            }
        }
    }

    /// Makes the engine's lease table the store's: every row in, every record the store
    /// no longer has out.
    async fn reload_leases(&self) -> Result<usize, StoreError> {
        let rows = self.store.leases_async().await?;
        let Some(engine) = self.engine() else { return Ok(0) };
        let mut e = lock(&engine);
        let in_store: HashSet<Ipv4Addr> = rows.iter().map(|r| r.ip).collect();
        let gone: Vec<(Ipv4Addr, MacAddr)> =
            e.leases().iter().filter(|l| !in_store.contains(&l.ip)).map(|l| (l.ip, l.mac)).collect();
        for (ip, mac) in gone {
            self.forget(&mut e, ip, mac);
        }
        for r in &rows {
            match from_record(r) {
                Some(l) => self.learn(&mut e, l),
                None => tracing::warn!(ip = %r.ip, "unreadable lease row skipped"),
            }
        }
        Ok(rows.len())
    }

    async fn reload_or_warn(&self) {
        match self.reload_leases().await {
            Ok(n) => tracing::info!(leases = n, "lease table read again from the shared store"),
            Err(e) => tracing::warn!(error = %e, "reading the shared lease table failed"),
        }
    }

    fn set_live(&self, live: Vec<String>) {
        let mut cur = self.live.write().unwrap_or_else(|e| e.into_inner());
        if *cur == live {
            return;
        }
        let gone: Vec<&String> = cur.iter().filter(|s| !live.contains(s)).collect();
        let came: Vec<&String> = live.iter().filter(|s| !cur.contains(s)).collect();
        tracing::info!(live = %live.join(","), ?gone, ?came, "DHCP servers on the shared store changed");
        metrics::gauge!("fleetboot_dhcp_live_servers").set(live.len() as f64);
        let slot = live.iter().position(|s| *s == self.name).unwrap_or(0) as u32;
        if let Some(engine) = self.engine() {
            lock(&engine).set_share(Share::new(slot, live.len() as u32));
        }
        *cur = live;
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let live = self.store.dhcp_heartbeat(&self.name, self.liveness.peer_timeout).await?;
        self.set_live(live);
        Ok(())
    }

    /// Heartbeats until the task is dropped; keeps the live set.
    async fn membership(self: Arc<Self>) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.liveness.heartbeat) => {}
                _ = self.membership_changed.notified() => {}
            }
            match self.heartbeat().await {
                Ok(()) if failing => {
                    tracing::info!("the shared store answers heartbeats again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    // Without the store no lease commits either: nothing is ACKed, so the
                    // last view of who is alive can stand.
                    if !failing {
                        tracing::warn!(error = %e, "DHCP heartbeat failed");
                        failing = true;
                    }
                }
            }
        }
    }

    /// Applies what the other servers announce, until the task is dropped.
    async fn follow(self: Arc<Self>, mut rx: tokio::sync::broadcast::Receiver<fleetboot_store::Notice>) {
        use tokio::sync::broadcast::error::RecvError;
        let me = self.store.notice_origin().unwrap_or_default().to_string();
        loop {
            let n = match rx.recv().await {
                Ok(n) => n,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "fell behind the shared store's notices; reading every lease again");
                    self.reload_or_warn().await;
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            match n.kind {
                NoticeKind::Leases if n.origin != me => {
                    let Some(engine) = self.engine() else { continue };
                    let notices = fleetboot_store::parse_notices(&n.body);
                    let mut e = lock(&engine);
                    for l in notices {
                        if l.is_removal() {
                            if let Ok(mac) = l.mac.parse() {
                                self.forget(&mut e, l.ip, mac);
                            }
                        } else if let Some(lease) = from_record(&l.record()) {
                            self.learn(&mut e, lease);
                        }
                    }
                }
                NoticeKind::Servers => self.membership_changed.notify_one(),
                NoticeKind::Resync => {
                    self.membership_changed.notify_one();
                    self.reload_or_warn().await;
                }
                _ => {}
            }
        }
    }

    /// The MAC a removal applies to: the client of the exchange (a lease it replaced), else
    /// whoever this server knows at that address (a release). `None`: nobody known.
    fn removal_mac(&self, ip: Ipv4Addr, binds: &[fleetboot_store::LeaseRecord]) -> Option<String> {
        binds.first().map(|b| b.mac.clone()).or_else(|| self.shared()?.mac_of(ip).map(|m| m.to_string()))
    }
}

impl LeaseStore for SharedLeases {
    /// The engine's lease writes as one conditional commit: the binds win only if their
    /// addresses are free or already their clients' in the store; a removal carries the
    /// MAC that held the address, so it never removes another client's lease.
    fn commit(&self, writes: Vec<Write>) -> Commit<'_> {
        Box::pin(async move {
            let mut commit = LeaseCommit { now: super::shared::now_ms() / 1000, ..Default::default() };
            let mut removes = Vec::new();
            let mut other = Vec::new();
            for w in writes {
                match w {
                    Write::UpsertLease(l) => commit.binds.push(l),
                    Write::RemoveLease(ip) => removes.push(ip),
                    w => other.push(w),
                }
            }
            for ip in removes {
                match self.removal_mac(ip, &commit.binds) {
                    Some(mac) => commit.removes.push((ip, mac)),
                    None => tracing::debug!(%ip, "removal of an address no client is known to hold; skipped"),
                }
            }
            if !other.is_empty() {
                self.store.write(other).await?;
            }
            let mine = commit.binds.first().and_then(|b| b.mac.parse::<MacAddr>().ok());
            match self.store.commit_leases(commit).await {
                Err(StoreError::LeaseConflict { ip, current }) => {
                    metrics::counter!("fleetboot_dhcp_lease_conflicts_total").increment(1);
                    if let Some(engine) = self.engine() {
                        let mut e = lock(&engine);
                        match current.as_ref().and_then(from_record) {
                            Some(holder) => self.learn(&mut e, holder),
                            // Nobody holds it by now: at least not the client this
                            // server just bound it to.
                            None => {
                                if let Some(mac) = mine {
                                    self.forget(&mut e, ip, mac);
                                }
                            }
                        }
                    }
                    tracing::debug!(%ip, holder = ?current.as_ref().map(|c| &c.mac), "address taken through another server; reply withheld");
                    Err(StoreError::LeaseConflict { ip, current })
                }
                other => other,
            }
        })
    }
}

/// Ends a DHCP service's membership when it stops: its tasks end, and it says it left.
pub struct Attached {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    leases: Arc<SharedLeases>,
}

impl Attached {
    pub fn leases(&self) -> &Arc<SharedLeases> {
        &self.leases
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Best effort: the others see this server gone now rather than after the timeout.
        let (store, name) = (self.leases.store.clone(), self.leases.name.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.dhcp_announce(&name, false).await;
            });
        }
    }
}

/// The lease store for a DHCP server on a shared store (`None` on SQLite: one server).
pub fn lease_store(store: &Store, config: &crate::config::Config) -> Option<Arc<SharedLeases>> {
    let serves_leases = config.dhcp.mode == crate::config::DhcpMode::Server;
    (store.is_shared() && serves_leases)
        .then(|| SharedLeases::new(store.clone(), config.server_name(), config.store.liveness))
}

/// Joins the DHCP servers of the shared store before the first datagram is answered: says
/// it joined, learns who is alive, reads every lease into `engine`, then keeps both up
/// to date until the returned guard is dropped. `None` without a shared store.
pub async fn attach(shared: &Arc<Shared>, engine: &Arc<Shell>) -> anyhow::Result<Option<Attached>> {
    let Some(leases) = shared.cluster.get().cloned() else { return Ok(None) };
    let _ = leases.engine.set(Arc::downgrade(engine));
    let _ = leases.shared.set(Arc::downgrade(shared));
    // Subscribed before the first read: what commits meanwhile is applied after it.
    let rx = leases.store.subscribe().ok_or_else(|| anyhow::anyhow!("the shared store has no notices"))?;
    leases.store.dhcp_announce(&leases.name, true).await?;
    leases.heartbeat().await?;
    let restored = leases.reload_leases().await?;
    let tasks = vec![tokio::spawn(leases.clone().membership()), tokio::spawn(leases.clone().follow(rx))];
    tracing::info!(name = %leases.name, live = %leases.live().join(","), restored, "DHCP on a shared store: answering the clients that hash to this server");
    Ok(Some(Attached { tasks, leases }))
}

/// The longest pause between two attempts to reach a shared store at start.
const OPEN_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether a failure to open the store is the database not being reachable yet (worth
/// waiting for) rather than a setting to fix (credentials, URL, schema).
fn worth_waiting(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable(_) => true,
        // The server is starting up, shutting down or crashed and restarting.
        StoreError::Postgres(m) => ["SQLSTATE 57P03", "SQLSTATE 57P01", "SQLSTATE 57P02", "SQLSTATE 08"].iter().any(|c| m.contains(c)),
        _ => false,
    }
}

/// Opens `config`'s store. A shared store that cannot be reached yet (the database host
/// still booting, PostgreSQL restarting) is waited for — tried again after a pause that
/// grows to [`OPEN_RETRY_MAX`], each failure logged — instead of ending `fleetboot serve`:
/// nothing is served meanwhile (no lease could be committed anyway). Any other error
/// (credentials refused, a bad URL, a schema behind with `migrate = "manual"`) and every
/// SQLite error end it at once.
pub async fn open_store_waiting(config: &crate::config::Config) -> Result<Store, StoreError> {
    let mut pause = std::time::Duration::from_millis(500);
    let mut attempts = 0u64;
    loop {
        match config.open_store() {
            Ok(store) => {
                if attempts > 0 {
                    tracing::info!(attempts, "the shared store answers: starting");
                }
                return Ok(store);
            }
            Err(e) if config.store.is_shared() && worth_waiting(&e) => {
                attempts += 1;
                tracing::warn!(error = %e, attempt = attempts, retry_in_ms = pause.as_millis() as u64,
                    "the shared store is unreachable; waiting for it before serving");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(OPEN_RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Profile names waiting to be read again at most; beyond, every profile is read.
pub const MAX_PENDING_PROFILES: usize = 256;

static PROFILE_NOTICES_OVERFLOWED: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);
static PROFILE_NOTICES_LOST: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);
static PROFILE_READ_FAILED: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);

/// What the profile notices heard since the last read ask for.
#[derive(Debug, Default, PartialEq, Eq)]
struct PendingProfiles {
    names: BTreeSet<String>,
    /// Why every profile must be read (`None`: only `names`).
    everything: Option<&'static str>,
    /// Profile notices behind this (for the applied-notices counter).
    notices: u64,
}

impl PendingProfiles {
    fn is_empty(&self) -> bool {
        self.names.is_empty() && self.everything.is_none()
    }

    fn read_everything(&mut self, why: &'static str) {
        self.everything.get_or_insert(why);
        self.names.clear();
    }

    fn hear(&mut self, n: &fleetboot_store::Notice) {
        metrics::counter!("fleetboot_store_notices_received_total", "kind" => n.kind.as_str()).increment(1);
        match n.kind {
            NoticeKind::Profiles => {
                self.notices += 1;
                if self.everything.is_some() {
                    return;
                }
                match fleetboot_store::parse_profile_names(&n.body) {
                    Some(names) => {
                        self.names.extend(names);
                        if self.names.len() > MAX_PENDING_PROFILES {
                            metrics::counter!("fleetboot_store_notices_overflow_total", "kind" => "profiles").increment(1);
                            if let Some(skipped) = PROFILE_NOTICES_OVERFLOWED.ready() {
                                tracing::warn!(max = MAX_PENDING_PROFILES, skipped,
                                    "more changed profiles at once than are read one by one: reading every profile");
                            }
                            self.read_everything("many changes");
                        }
                    }
                    None => self.read_everything("unnamed change"),
                }
            }
            // Whatever was said while the listener was away is lost.
            NoticeKind::Resync => self.read_everything("listener reconnected"),
            _ => {}
        }
    }

    fn lost(&mut self, missed: u64) {
        metrics::counter!("fleetboot_store_notices_lost_total").increment(missed);
        if let Some(skipped) = PROFILE_NOTICES_LOST.ready() {
            tracing::warn!(missed, skipped, "fell behind the shared store's notices: reading every profile");
        }
        self.read_everything("notices lost");
    }
}

/// Reads what `pending` asks for into `shared`'s profiles. The store's rows win: a name
/// with no row any more is dropped, an unreadable row is skipped (as at start).
async fn apply_profiles(shared: &Shared, pending: &PendingProfiles) -> Result<(), StoreError> {
    let parse = |rows: Vec<fleetboot_store::StoredProfile>| -> Vec<fleetboot_boot::Profile> {
        rows.into_iter()
            .filter_map(|r| match serde_json::from_str(&r.json) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(profile = %r.name, error = %e, "stored profile is unreadable; skipped");
                    None
                }
            })
            .collect()
    };
    match pending.everything {
        Some(why) => {
            let profiles = parse(shared.store.profiles_async().await?);
            let count = profiles.len();
            *shared.profiles.write().unwrap_or_else(|e| e.into_inner()) = profiles;
            metrics::counter!("fleetboot_profile_reloads_total", "scope" => "all").increment(1);
            tracing::info!(profiles = count, why, "every boot profile read again from the shared store");
        }
        None => {
            let names: Vec<String> = pending.names.iter().cloned().collect();
            let fresh = parse(shared.store.profiles_named_async(names.clone()).await?);
            {
                let mut profiles = shared.profiles.write().unwrap_or_else(|e| e.into_inner());
                profiles.retain(|p| !pending.names.contains(&p.name));
                profiles.extend(fresh.iter().cloned());
            }
            metrics::counter!("fleetboot_profile_reloads_total", "scope" => "named").increment(1);
            let now: Vec<&str> = fresh.iter().map(|p| p.name.as_str()).collect();
            tracing::info!(changed = %names.join(","), present = %now.join(","), "boot profiles read again after a change in the shared store");
        }
    }
    metrics::counter!("fleetboot_store_notices_applied_total", "kind" => "profiles").increment(pending.notices);
    Ok(())
}

/// Keeps `shared`'s boot profiles those of the shared store: reads again the profiles the
/// notices on `rx` name (see the module documentation). Runs until the store is gone.
/// `rx` must be subscribed before the profiles in `shared` were read, so that nothing
/// committed after that read goes unheard.
pub async fn follow_profiles(shared: Arc<Shared>, mut rx: tokio::sync::broadcast::Receiver<fleetboot_store::Notice>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut pending = PendingProfiles::default();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Ok(n) => pending.hear(&n),
                Err(RecvError::Lagged(missed)) => pending.lost(missed),
                Err(RecvError::Closed) => return,
            }
        }
        // Everything already queued joins this read: one read for a burst of changes.
        loop {
            match rx.try_recv() {
                Ok(n) => pending.hear(&n),
                Err(TryRecvError::Lagged(missed)) => pending.lost(missed),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        if pending.is_empty() {
            continue;
        }
        match apply_profiles(&shared, &pending).await {
            Ok(()) => pending = PendingProfiles::default(),
            Err(e) => {
                // Unreachable store: what changed meanwhile is unknown too. Try again
                // shortly, then read them all.
                if let Some(skipped) = PROFILE_READ_FAILED.ready() {
                    tracing::warn!(error = %e, skipped, "reading changed profiles from the shared store failed; retrying");
                }
                pending.read_everything("retry after a failed read");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetboot_store::Notice;

    fn notice(kind: NoticeKind, body: &str) -> Notice {
        Notice { origin: "x".into(), kind, body: body.into() }
    }

    #[test]
    fn only_an_unreachable_database_is_waited_for() {
        assert!(worth_waiting(&StoreError::Unavailable("connection refused".into())));
        assert!(worth_waiting(&StoreError::Postgres("the database system is starting up (SQLSTATE 57P03)".into())));
        assert!(!worth_waiting(&StoreError::Postgres("password authentication failed for user \"x\" (SQLSTATE 28P01)".into())));
        assert!(!worth_waiting(&StoreError::Config("store.url: invalid".into())));
    }

    #[test]
    fn profile_notices_coalesce_and_fall_back_to_reading_everything() {
        let mut p = PendingProfiles::default();
        assert!(p.is_empty());
        p.hear(&notice(NoticeKind::Profiles, r#"["a","b"]"#));
        p.hear(&notice(NoticeKind::Leases, "[]"));
        p.hear(&notice(NoticeKind::Profiles, r#"["b","c"]"#));
        assert_eq!(p.names.iter().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!((p.everything, p.notices), (None, 2));

        let mut unnamed = PendingProfiles::default();
        unnamed.hear(&notice(NoticeKind::Profiles, ""));
        assert_eq!(unnamed.everything, Some("unnamed change"));

        let mut resync = PendingProfiles::default();
        resync.hear(&notice(NoticeKind::Resync, ""));
        assert!(!resync.is_empty());
        assert_eq!(resync.everything, Some("listener reconnected"));

        let mut many = PendingProfiles::default();
        for i in 0..=MAX_PENDING_PROFILES {
            many.hear(&notice(NoticeKind::Profiles, &format!(r#"["p{i}"]"#)));
        }
        assert_eq!(many.everything, Some("many changes"));
        assert!(many.names.is_empty(), "the names are not kept once everything is read");

        let mut lost = PendingProfiles::default();
        lost.hear(&notice(NoticeKind::Profiles, r#"["a"]"#));
        lost.lost(3);
        assert_eq!(lost.everything, Some("notices lost"));
        assert!(lost.names.is_empty());
    }

    #[test]
    fn each_client_has_one_owner_and_only_a_dead_servers_clients_move() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let two: Vec<String> = ["a", "c"].iter().map(|s| s.to_string()).collect();
        let mut per = std::collections::BTreeMap::new();
        let mut moved = 0;
        for i in 0..3000u32 {
            let mac = [0x52, 0x54, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let o3 = owner(&three, &mac).unwrap();
            *per.entry(o3).or_insert(0) += 1;
            let o2 = owner(&two, &mac).unwrap();
            if o3 != "b" {
                assert_eq!(o2, o3, "a client of a live server moved");
            } else {
                moved += 1;
            }
        }
        assert!(per.values().all(|&n| n > 800), "{per:?}");
        assert_eq!(moved, per["b"]);
        assert_eq!(owner(&[], &[0; 6]), None);
    }

    #[test]
    fn the_filter_reads_mac_secs_address_and_server_id() {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[9] = 3;
        b[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 7]);
        b[236..240].copy_from_slice(&[99, 130, 83, 99]);
        b.extend_from_slice(&[53, 1, 1, 0, 255]);
        let p = peek(&b).unwrap();
        assert_eq!(p, Peek { mac: [2, 0, 0, 0, 0, 7], secs: 3, has_address: false, names_a_server: false });
        b.truncate(240);
        b.extend_from_slice(&[53, 1, 3, 54, 4, 10, 0, 0, 1, 255]);
        assert!(peek(&b).unwrap().names_a_server);
        b[12..16].copy_from_slice(&[10, 0, 0, 9]);
        assert!(peek(&b).unwrap().has_address);
        assert!(peek(&b[..100]).is_none());
        // Truncated options: read what is there, never panic.
        b.truncate(243);
        let _ = peek(&b);
        // A reply, or another hardware type, is the engine's to judge.
        let mut reply = b.clone();
        reply[0] = 2;
        assert!(peek(&reply).is_none());
    }
}

//! The operators' live view of the boot network: a row per client — where it is in its
//! boot (DHCP, port 4011, TFTP, HTTP, ...), what it last did, how many bytes it has been
//! sent, and a "stuck" flag when it has gone quiet before finishing — on the admin
//! listener, behind the same tokens as the API.
//!
//! - [`Board`] is the state: filled from every boot-trace event ([`Shared::trace`] calls
//!   [`Board::observe`]), bounded by `admin.dashboard_max_clients` (the client quiet the
//!   longest makes room, counted in `fleetboot_dashboard_evicted_total`). No I/O, no clock:
//!   times come in as arguments, so its rules are unit-tested.
//! - `GET /dashboard`: the page, rendered on the server (it reads without JavaScript); a
//!   few lines of inline JavaScript then follow `GET /dashboard/events`, server-sent
//!   events that carry, once a second and only when something changed, the rows that
//!   changed — so a client that sends a thousand events a second costs one update a second.
//! - `GET /dashboard/client/<mac>`: one client's boot timeline (its trace from the store).
//! - `GET /api/dashboard`: the rows as JSON, for scripts.
//! - Browsers cannot send a bearer header on their own: `POST /dashboard/login` takes a
//!   token once and sets it as an `HttpOnly`, `SameSite=Strict` cookie. The cookie is
//!   accepted for reading only ([`super::admin`]): a page another site makes the browser
//!   load cannot change anything with it.
//!
//! [`Shared::trace`]: super::shared::Shared::trace

use super::admin::{authenticate, SESSION_COOKIE};
use super::shared::{now_ms, LogLimit, Shared};
use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleetboot_auth::Role;
use fleetboot_boot::MacAddr;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Where a client is in its boot, from the kind of its latest trace event.
fn stage_of(kind: &str) -> &'static str {
    match kind {
        "DHCPDISCOVER" | "DHCPOFFER" | "DHCPREQUEST" | "DHCPACK" | "DHCPNAK" | "DECLINED" => "DHCP",
        "BOOTSERVER-ACK" => "4011",
        k if k.starts_with("PROXY") => "ProxyDHCP",
        k if k.starts_with("TFTP") => "TFTP",
        k if k.starts_with("HTTP") => "HTTP",
        k if k.starts_with("NBD") => "NBD",
        k if k.starts_with("STREAM") => "stream",
        k if k.starts_with("AGENT") || k.starts_with("FLEET") => "agent",
        _ => "other",
    }
}

/// What an event says about the step it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// The step has started and the client should come back for more.
    Moving,
    /// The step finished (a file sent, a script or configuration handed over).
    Done,
    /// The step was refused or failed.
    Failed,
}

fn step_state(kind: &str) -> StepState {
    if kind.ends_with("-REFUSED") || kind.ends_with("-FAILED") || kind == "DHCPNAK" || kind == "DECLINED" {
        StepState::Failed
    } else if kind.ends_with("-DONE") || matches!(kind, "HTTP-GET" | "HTTP-IMAGE" | "HTTP-SCRIPT" | "HTTP-CONFIG") {
        StepState::Done
    } else {
        StepState::Moving
    }
}

/// The first `<n> bytes` in an event's detail (`"/vmlinuz 5242880 bytes in 0.4s"`).
fn bytes_in(detail: &str) -> Option<u64> {
    let words: Vec<&str> = detail.split_whitespace().collect();
    words.windows(2).find(|w| w[1] == "bytes").and_then(|w| w[0].parse().ok())
}

/// One client as the dashboard shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub mac: String,
    pub ip: Option<Ipv4Addr>,
    pub group: Option<String>,
    pub stage: &'static str,
    pub state: StepState,
    /// Quiet for longer than `admin.dashboard_stuck_after` while its step was moving.
    pub stuck: bool,
    /// The latest event: its kind and detail.
    pub last: String,
    pub detail: String,
    /// Bytes of the current file (as asked), and bytes sent to this client in all.
    pub file_bytes: Option<u64>,
    pub sent_bytes: u64,
    /// Bytes per second of the last transfer that finished (TFTP reports start and end).
    pub rate: Option<u64>,
    /// The catalog image and version it last read over HTTP.
    pub image: Option<String>,
    pub first_ms: u64,
    pub last_ms: u64,
    #[serde(skip)]
    seq: u64,
    #[serde(skip)]
    transfer_started_ms: Option<u64>,
}

struct Inner {
    rows: HashMap<MacAddr, Row>,
    /// Bumped on every change; a row carries the value of its latest change.
    seq: u64,
}

/// Every client the server has heard of lately, bounded.
pub struct Board {
    inner: Mutex<Inner>,
    max_clients: usize,
    stuck_after_ms: u64,
    evictions_logged: LogLimit,
    /// The other panels, read at most every [`PANEL_REFRESH_MS`] whoever asks.
    panels: tokio::sync::Mutex<PanelCache>,
}

impl Board {
    pub fn new(max_clients: usize, stuck_after: Duration) -> Board {
        Board {
            inner: Mutex::new(Inner { rows: HashMap::new(), seq: 0 }),
            max_clients: max_clients.max(1),
            stuck_after_ms: stuck_after.as_millis() as u64,
            evictions_logged: LogLimit::new(Duration::from_secs(10)),
            panels: tokio::sync::Mutex::new(PanelCache::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One trace event of `mac` at `now_ms`.
    pub fn observe(&self, mac: MacAddr, group: Option<&str>, kind: &str, detail: &str, now_ms: u64) {
        let mut inner = self.lock();
        if !inner.rows.contains_key(&mac) && inner.rows.len() >= self.max_clients {
            // The client quiet the longest is the one an operator is least likely watching.
            if let Some(oldest) = inner.rows.values().min_by_key(|r| r.last_ms).and_then(|r| r.mac.parse::<MacAddr>().ok()) {
                inner.rows.remove(&oldest);
            }
            metrics::counter!("fleetboot_dashboard_evicted_total").increment(1);
            if let Some(held_back) = self.evictions_logged.allow() {
                tracing::warn!(max = self.max_clients, held_back, "dashboard full: the quietest client's row dropped (admin.dashboard_max_clients)");
            }
        }
        inner.seq += 1;
        let seq = inner.seq;
        let row = inner.rows.entry(mac).or_insert_with(|| Row {
            mac: mac.to_string(),
            ip: None,
            group: None,
            stage: "other",
            state: StepState::Moving,
            stuck: false,
            last: String::new(),
            detail: String::new(),
            file_bytes: None,
            sent_bytes: 0,
            rate: None,
            image: None,
            first_ms: now_ms,
            last_ms: now_ms,
            seq,
            transfer_started_ms: None,
        });
        row.group = group.map(str::to_string);
        row.stage = stage_of(kind);
        row.state = step_state(kind);
        row.last = kind.to_string();
        row.detail = detail.chars().take(200).collect();
        row.last_ms = now_ms;
        row.seq = seq;
        match kind {
            "DHCPOFFER" | "DHCPACK" => {
                if let Some(ip) = detail.split_whitespace().next().and_then(|w| w.parse().ok()) {
                    row.ip = Some(ip);
                }
            }
            "TFTP-RRQ" => {
                row.file_bytes = bytes_in(detail);
                row.transfer_started_ms = Some(now_ms);
            }
            "TFTP-DONE" => {
                let sent = bytes_in(detail).unwrap_or(0);
                row.sent_bytes += sent;
                if let Some(started) = row.transfer_started_ms.take() {
                    let ms = now_ms.saturating_sub(started).max(1);
                    row.rate = Some(sent.saturating_mul(1000) / ms);
                }
            }
            "HTTP-GET" | "HTTP-IMAGE" => {
                let sent = bytes_in(detail).unwrap_or(0);
                row.file_bytes = Some(sent);
                row.sent_bytes += sent;
                if kind == "HTTP-IMAGE" {
                    row.image = detail.split_whitespace().take(2).collect::<Vec<_>>().join(" ").into();
                }
            }
            _ => {}
        }
        metrics::gauge!("fleetboot_dashboard_clients").set(inner.rows.len() as f64);
    }

    /// Every row as of `now_ms`, the quietest last.
    pub fn rows(&self, now_ms: u64) -> Vec<Row> {
        let mut rows: Vec<Row> = self.lock().rows.values().map(|r| self.view(r, now_ms)).collect();
        rows.sort_by(|a, b| b.last_ms.cmp(&a.last_ms).then_with(|| a.mac.cmp(&b.mac)));
        rows
    }

    /// The rows whose content changed after `since` or whose stuck flag differs from what
    /// `stuck` (the set this viewer was last told) says, and the sequence number to ask
    /// from next time; `stuck` is brought up to date.
    pub fn changes(&self, since: u64, stuck: &mut std::collections::HashSet<String>, now_ms: u64) -> (Vec<Row>, u64) {
        let inner = self.lock();
        let mut out = Vec::new();
        for r in inner.rows.values() {
            let v = self.view(r, now_ms);
            let was_stuck = stuck.contains(&v.mac);
            if r.seq > since || v.stuck != was_stuck {
                if v.stuck {
                    stuck.insert(v.mac.clone());
                } else {
                    stuck.remove(&v.mac);
                }
                out.push(v);
            }
        }
        stuck.retain(|m| m.parse::<MacAddr>().is_ok_and(|mac| inner.rows.contains_key(&mac)));
        (out, inner.seq)
    }

    fn view(&self, r: &Row, now_ms: u64) -> Row {
        let mut v = r.clone();
        v.stuck = r.state == StepState::Moving && now_ms.saturating_sub(r.last_ms) > self.stuck_after_ms;
        v
    }
}

/// How often the panels are read again from their sources (catalog, store, config): once
/// for every viewer, however many are open.
const PANEL_REFRESH_MS: u64 = 2_000;
/// At most this many items per panel (the JSON says how many more there were).
const PANEL_MAX_ITEMS: usize = 500;

/// One panel: whether its feature is configured here, a sentence when it has something to
/// say (not configured, empty, unreadable), and its items.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Panel<T> {
    pub configured: bool,
    pub note: Option<String>,
    pub items: Vec<T>,
    /// Items beyond [`PANEL_MAX_ITEMS`], left out.
    pub more: usize,
}

impl<T> Panel<T> {
    fn off(why: impl Into<String>) -> Panel<T> {
        Panel { configured: false, note: Some(why.into()), items: Vec::new(), more: 0 }
    }

    fn of(mut items: Vec<T>, note: Option<String>) -> Panel<T> {
        let more = items.len().saturating_sub(PANEL_MAX_ITEMS);
        items.truncate(PANEL_MAX_ITEMS);
        Panel { configured: true, note, items, more }
    }

    fn unreadable(what: &str, e: impl std::fmt::Display) -> Panel<T> {
        Panel { configured: true, note: Some(format!("cannot read {what}: {e}")), items: Vec::new(), more: 0 }
    }
}

/// A version of a catalog image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageItem {
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub size: u64,
    pub imported_at: u64,
    pub source_format: String,
    /// The newest version of its name: what `NAME` without a version serves.
    pub latest: bool,
}

/// A multicast stream session: of the `[stream]` section, and/or reported by the process
/// sending it (`fleetboot stream serve` with the same `data_dir`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamItem {
    pub image: String,
    pub group: Option<String>,
    pub rate: Option<u64>,
    pub min_receivers: Option<u32>,
    pub lockstep: bool,
    /// In this server's `[stream]` section (else only reported by a sender).
    pub configured: bool,
    /// What its sender reported last; `None`: no sender reports it.
    pub live: Option<StreamLive>,
}

/// A stream session's figures, as its sender reported them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamLive {
    #[serde(flatten)]
    pub status: crate::status::StreamLive,
    /// Bytes sent ÷ image size: 1.0 is every byte once.
    pub egress_ratio: f64,
    /// Whether the sending process still runs.
    pub running: bool,
}

/// A boot negotiator or a multicast file server: configured here and/or reporting from its
/// process (`fleetboot negotiate`, `fleetboot files`, or this one).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NegotiatorItem {
    /// `negotiator` or `file server`.
    pub role: String,
    /// Where it listens.
    pub listen: String,
    /// The multicast groups it hands out or serves.
    pub groups: Vec<String>,
    /// Who it talks to: file servers and peer negotiators, or the peer group.
    pub peers: Vec<String>,
    /// The process reporting it, and whether that process still runs (`None`: no report).
    pub pid: Option<u32>,
    pub running: Option<bool>,
    /// The (group, port)s in use right now, as reported.
    pub slots: Vec<crate::status::SlotLive>,
}

/// A node of the provisioning master: what it should run and what it reported running.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeItem {
    pub name: String,
    pub mac: String,
    pub phase: String,
    /// `kind name version`, the image first: what the configuration selects today.
    pub assigned: Vec<String>,
    /// `kind name version`: what the node last reported installed.
    pub running: Vec<String>,
    /// Whether it runs something else than assigned; unknown until it has reported.
    pub drift: Option<bool>,
    pub last_seen_ms: u64,
    /// Why nothing can be selected for it.
    pub problem: Option<String>,
}

/// What an edge cache holds of a published version, as it last reported.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheItem {
    pub cache: String,
    pub name: String,
    pub version: u64,
    pub sha256: String,
    /// The cache's verification state of it (`verified`, `fetching`, ...).
    pub state: String,
    pub changed_ms: u64,
}

/// Everything besides the clients: read from the catalog, the store and the config.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Panels {
    pub images: Panel<ImageItem>,
    pub streams: Panel<StreamItem>,
    pub negotiators: Panel<NegotiatorItem>,
    pub nodes: Panel<NodeItem>,
    pub caches: Panel<CacheItem>,
}

/// The panels as last read, shared by every viewer.
pub(super) struct PanelCache {
    read_ms: Option<u64>,
    /// Bumped when what was read differs from the previous read.
    generation: u64,
    panels: Option<Arc<(Panels, String)>>,
}

impl PanelCache {
    pub(super) fn new() -> PanelCache {
        PanelCache { read_ms: None, generation: 0, panels: None }
    }
}

/// Reads every panel from its source. Blocking (files, SQLite): call it off the runtime.
pub fn read_panels(shared: &Shared) -> Panels {
    let config = &shared.config;
    let reports = crate::status::read_reports(&config.data_dir, crate::status::unix_ms());
    if let Err(e) = &reports {
        tracing::debug!(error = %e, "reading the status reports of streams, negotiators and file servers");
    }
    let reports = reports.unwrap_or_default();
    Panels {
        images: images_panel(&config.data_dir),
        streams: streams_panel(config, &reports),
        negotiators: negotiators_panel(config, &reports, std::process::id()),
        nodes: nodes_panel(shared),
        caches: caches_panel(shared),
    }
}

fn images_panel(data_dir: &std::path::Path) -> Panel<ImageItem> {
    let list = match fleetboot_images::Catalog::open_dir(data_dir).and_then(|c| c.list()) {
        Ok(l) => l,
        Err(e) => return Panel::unreadable("the image catalog", e),
    };
    let items: Vec<ImageItem> = list
        .iter()
        .map(|v| ImageItem {
            name: v.name.clone(),
            version: v.version,
            sha256: v.sha256.clone(),
            size: v.size,
            imported_at: v.imported_at,
            source_format: v.source_format.clone(),
            latest: !list.iter().any(|o| o.name == v.name && o.version > v.version),
        })
        .collect();
    let note = items.is_empty().then(|| "The catalog is empty: fleetboot image import FILE --config F.".to_string());
    Panel::of(items, note)
}

fn streams_panel(config: &crate::config::Config, reports: &[crate::status::Seen]) -> Panel<StreamItem> {
    let mut live: Vec<(StreamLive, bool)> = reports
        .iter()
        .filter(|r| r.report.role == "stream")
        .flat_map(|r| {
            r.report.streams.iter().map(|s| {
                let egress_ratio = if s.image_size == 0 { 0.0 } else { (s.bytes_sent as f64 / s.image_size as f64 * 100.0).round() / 100.0 };
                (StreamLive { status: s.clone(), egress_ratio, running: r.running }, false)
            })
        })
        .collect();
    if config.stream.is_none() && live.is_empty() {
        return Panel::off("Multicast streaming is not configured (no [stream] section) and no stream session reports here.");
    }
    // A configured session takes the figures of the first report of its image (running
    // senders first); the reports left over are sessions of another config.
    live.sort_by_key(|(l, _)| !l.running);
    let mut items: Vec<StreamItem> = Vec::new();
    for s in config.stream.iter().flat_map(|st| &st.sessions) {
        let found = live.iter_mut().find(|(l, taken)| !*taken && l.status.image == s.image);
        let live = found.map(|(l, taken)| {
            *taken = true;
            l.clone()
        });
        items.push(StreamItem {
            image: s.image.clone(),
            group: s.group.map(|g| g.to_string()),
            rate: s.rate,
            min_receivers: s.min_receivers,
            lockstep: s.lockstep,
            configured: true,
            live,
        });
    }
    for (l, _) in live.into_iter().filter(|(_, taken)| !taken) {
        items.push(StreamItem {
            image: l.status.image.clone(),
            group: Some(l.status.group.clone()),
            rate: None,
            min_receivers: None,
            lockstep: l.status.state == "lock-step",
            configured: false,
            live: Some(l),
        });
    }
    let note = if items.iter().any(|i| i.live.is_some()) {
        None
    } else {
        Some("No sender reports these sessions yet: fleetboot stream serve --config F (the fleetboot-stream unit, same data_dir) sends them and reports receivers, repairs and bytes sent here.".into())
    };
    Panel::of(items, note)
}

fn negotiators_panel(config: &crate::config::Config, reports: &[crate::status::Seen], me: u32) -> Panel<NegotiatorItem> {
    let reporting: Vec<&crate::status::Seen> = reports.iter().filter(|r| r.report.role == "negotiator" || r.report.role == "file server").collect();
    if config.negotiate.is_none() && config.files.is_none() && reporting.is_empty() {
        return Panel::off("No boot negotiator or multicast file server runs here (no [negotiate] or [files] section) and none reports here.");
    }
    // This process's own report goes with its configured item.
    let own = |role: &str| reporting.iter().find(|r| r.report.pid == me && r.report.role == role);
    let mut items = Vec::new();
    if let Some(n) = &config.negotiate {
        let mut peers: Vec<String> = n.file_servers.iter().map(|f| format!("file server {f}")).collect();
        peers.extend(n.peers.group.map(|g| format!("peer group {g}:{}", n.peers.port)));
        peers.extend(n.peers.list.iter().map(|p| format!("peer {p}:{}", n.peers.port)));
        let report = own("negotiator");
        items.push(NegotiatorItem {
            role: "negotiator".into(),
            listen: format!("{}:{}", config.address, n.listen_port),
            groups: n.groups.iter().map(|g| g.to_string()).collect(),
            peers,
            pid: report.map(|r| r.report.pid),
            running: report.map(|r| r.running),
            slots: report.map(|r| r.report.slots.clone()).unwrap_or_default(),
        });
    }
    if let Some(f) = &config.files {
        let mut groups = vec![format!("MTFTP port {}, at most {} groups at once", f.mtftp_port, f.max_groups)];
        groups.extend(f.rfc2090_groups.iter().map(|g| format!("{g} (RFC 2090)")));
        let report = own("file server");
        items.push(NegotiatorItem {
            role: "file server".into(),
            listen: format!("control port {}", f.control_port),
            groups,
            peers: f.peer_group.map(|g| format!("peer group {g}:{}", f.peer_port)).into_iter().collect(),
            pid: report.map(|r| r.report.pid),
            running: report.map(|r| r.running),
            slots: report.map(|r| r.report.slots.clone()).unwrap_or_default(),
        });
    }
    // Negotiators and file servers of other processes on this host (`fleetboot negotiate`,
    // `fleetboot files`).
    for r in reporting.iter().filter(|r| r.report.pid != me) {
        items.push(NegotiatorItem {
            role: r.report.role.clone(),
            listen: r.report.server.clone(),
            groups: Vec::new(),
            peers: Vec::new(),
            pid: Some(r.report.pid),
            running: Some(r.running),
            slots: r.report.slots.clone(),
        });
    }
    // The panel's bound counts the slots too: they are its rows.
    let mut room = PANEL_MAX_ITEMS;
    let mut left_out = 0;
    for i in &mut items {
        let keep = i.slots.len().min(room);
        left_out += i.slots.len() - keep;
        i.slots.truncate(keep);
        room -= keep;
    }
    let mut panel = Panel::of(items, None);
    panel.more += left_out;
    panel
}

fn nodes_panel(shared: &Shared) -> Panel<NodeItem> {
    use fleetboot_fleet::select::{select, Want};
    let enabled = shared.config.fleet.as_ref().is_some_and(|f| f.enabled);
    let loaded = match crate::fleet::db::load(&shared.store) {
        Ok(l) => l,
        Err(e) if enabled => return Panel::unreadable("the master's nodes", format!("{e:#}")),
        Err(_) => return Panel::off("No provisioning master here ([fleet] enabled is not set)."),
    };
    if loaded.db.nodes.is_empty() && !enabled {
        return Panel::off("No provisioning master here ([fleet] enabled is not set) and no nodes in this store.");
    }
    let states = crate::fleet::db::node_states(&shared.store).unwrap_or_default();
    let items: Vec<NodeItem> = loaded
        .db
        .nodes
        .values()
        .map(|n| {
            let (assigned, problem) = match select(&loaded.db, n, Want::Configured) {
                Ok(s) => (
                    std::iter::once(&s.image).chain(&s.packages).map(|c| format!("{} {} {}", c.kind, c.name, c.version)).collect::<Vec<_>>(),
                    None,
                ),
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            let state = states.get(&n.name);
            let running: Vec<String> =
                state.map(|s| s.installed.iter().map(|i| format!("{} {} {}", i.kind, i.name, i.version)).collect()).unwrap_or_default();
            let drift = (!running.is_empty() && problem.is_none()).then(|| {
                let (mut a, mut r) = (assigned.clone(), running.clone());
                a.sort();
                r.sort();
                a != r
            });
            NodeItem {
                name: n.name.clone(),
                mac: n.mac.to_string(),
                phase: state
                    .and_then(|s| serde_json::to_value(s.phase).ok())
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "unknown".into()),
                assigned,
                running,
                drift,
                last_seen_ms: state.map_or(0, |s| s.last_seen_ms),
                problem,
            }
        })
        .collect();
    let note = items.is_empty().then(|| "No nodes yet: fleetboot node add.".to_string());
    Panel::of(items, note)
}

fn caches_panel(shared: &Shared) -> Panel<CacheItem> {
    let holdings = match shared.store.holdings() {
        Ok(h) => h,
        Err(e) if shared.config.origin.is_some() => return Panel::unreadable("the caches' holdings", e),
        Err(_) => return Panel::off("No edge caches report here (no [origin] section)."),
    };
    if holdings.is_empty() && shared.config.origin.is_none() {
        return Panel::off("No edge caches report here (no [origin] section).");
    }
    let items: Vec<CacheItem> = holdings
        .into_iter()
        .map(|h| CacheItem { cache: h.cache, name: h.name, version: h.version, sha256: h.sha256, state: h.state, changed_ms: h.changed_ms })
        .collect();
    let note = items.is_empty().then(|| "No cache has reported what it holds yet.".to_string());
    Panel::of(items, note)
}

/// The panels no older than [`PANEL_REFRESH_MS`], with their HTML and a generation that
/// changes only when their content does.
pub async fn current_panels(shared: &Arc<Shared>) -> (u64, Arc<(Panels, String)>) {
    let mut cache = shared.board.panels.lock().await;
    let now = now_ms();
    if let (Some(read), Some(p)) = (cache.read_ms, &cache.panels) {
        if now.saturating_sub(read) < PANEL_REFRESH_MS {
            return (cache.generation, p.clone());
        }
    }
    let s = shared.clone();
    let panels = match tokio::task::spawn_blocking(move || read_panels(&s)).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "reading the dashboard's panels failed");
            if let Some(p) = &cache.panels {
                return (cache.generation, p.clone());
            }
            let why = "the panels could not be read (see the server's log)";
            Panels { images: Panel::off(why), streams: Panel::off(why), negotiators: Panel::off(why), nodes: Panel::off(why), caches: Panel::off(why) }
        }
    };
    cache.read_ms = Some(now);
    if cache.panels.as_ref().is_none_or(|p| p.0 != panels) {
        let html = panels_html(&panels);
        cache.generation += 1;
        cache.panels = Some(Arc::new((panels, html)));
    }
    (cache.generation, cache.panels.clone().expect("set above"))
}

fn short_hash(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

/// A time as a date (UTC): panels are rendered when they change, not every second, so
/// "5 s ago" would go stale on the page.
fn when_ms(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    crate::image_cli::date(ms / 1000)
}

/// One row of a panel's table: its key, its cells, and `data-` attributes (the figures a
/// script or a test reads without parsing the cells).
type HtmlRow = (String, Vec<String>, Vec<(&'static str, String)>);

fn table_html(out: &mut String, class: &str, head: &[&str], rows: impl Iterator<Item = HtmlRow>) {
    out.push_str(&format!("<table class={class}><thead><tr>"));
    for h in head {
        out.push_str(&format!("<th>{}</th>", esc(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for (key, cells, data) in rows {
        out.push_str(&format!("<tr data-key=\"{}\"", esc(&key)));
        for (name, value) in data {
            out.push_str(&format!(" data-{name}=\"{}\"", esc(&value)));
        }
        out.push('>');
        for c in cells {
            out.push_str(&format!("<td>{}</td>", esc(&c)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

/// One panel as a `<section>`: its note, then a table whose rows carry `data-key`, then
/// `after` (more tables of the same panel, already escaped).
fn panel_html<T>(id: &str, title: &str, panel: &Panel<T>, head: &[&str], row: impl Fn(&T) -> HtmlRow, after: &str) -> String {
    let mut out = format!("<section id=panel-{id} class=panel data-configured={}><h2>{}</h2>", panel.configured, esc(title));
    if let Some(note) = &panel.note {
        out.push_str(&format!("<p class=note>{}</p>", esc(note)));
    }
    if !panel.items.is_empty() {
        table_html(&mut out, "items", head, panel.items.iter().map(row));
    }
    out.push_str(after);
    if panel.more > 0 {
        out.push_str(&format!("<p class=note>… and {} more (GET /api/dashboard has the first {PANEL_MAX_ITEMS}).</p>", panel.more));
    }
    out.push_str("</section>");
    out
}

/// Every panel, escaped; one line (it travels in one server-sent event).
pub fn panels_html(p: &Panels) -> String {
    let mut out = String::new();
    out.push_str(&panel_html("images", "Images and versions", &p.images, &["image", "version", "size", "sha256", "imported", "from"], |i| {
        (
            format!("{}:{}", i.name, i.version),
            vec![
                i.name.clone(),
                format!("{}{}", i.version, if i.latest { " (latest)" } else { "" }),
                human_bytes(i.size),
                short_hash(&i.sha256).to_string(),
                when_ms(i.imported_at.saturating_mul(1000)),
                i.source_format.clone(),
            ],
            Vec::new(),
        )
    }, ""));
    out.push_str(&panel_html(
        "streams",
        "Multicast streams",
        &p.streams,
        &["image", "group", "rate", "waits for", "lock-step", "state", "receivers", "repairs", "sent", "egress ÷ image"],
        |s| {
            let mut cells = vec![
                s.image.clone(),
                s.group.clone().or_else(|| s.live.as_ref().map(|l| l.status.group.clone())).unwrap_or_else(|| "default".into()),
                s.rate.map(|r| format!("{}/s", human_bytes(r))).unwrap_or_else(|| "default".into()),
                s.min_receivers.map(|n| format!("{n} receivers")).unwrap_or_default(),
                if s.lockstep { "yes" } else { "no" }.into(),
            ];
            let mut data = Vec::new();
            match &s.live {
                Some(l) => {
                    let st = &l.status;
                    cells.push(format!("{}{}", st.state, if l.running { "" } else { " (sender ended)" }));
                    cells.push(format!("{} ({} complete)", st.receivers, st.complete));
                    cells.push(format!("{} in {} rounds", st.repairs, st.rounds));
                    cells.push(human_bytes(st.bytes_sent));
                    cells.push(format!("{:.2}× of {}", l.egress_ratio, human_bytes(st.image_size)));
                    data = vec![
                        ("state", st.state.clone()),
                        ("receivers", st.receivers.to_string()),
                        ("complete", st.complete.to_string()),
                        ("repairs", st.repairs.to_string()),
                        ("bytes", st.bytes_sent.to_string()),
                        ("size", st.image_size.to_string()),
                    ];
                }
                None => cells.extend(["not reported".to_string(), String::new(), String::new(), String::new(), String::new()]),
            }
            (s.image.clone(), cells, data)
        },
        "",
    ));
    let slots: Vec<HtmlRow> = p
        .negotiators
        .items
        .iter()
        .flat_map(|n| {
            n.slots.iter().map(move |sl| {
                (
                    format!("{}/{}/{}", n.role, sl.group, sl.file),
                    vec![n.role.clone(), n.listen.clone(), sl.group.clone(), sl.file.clone(), sl.clients.to_string(), when_ms(sl.since_ms), sl.with.clone()],
                    vec![("clients", sl.clients.to_string())],
                )
            })
        })
        .collect();
    let mut after = String::new();
    if !slots.is_empty() {
        after.push_str("<h3>Groups in use</h3>");
        table_html(&mut after, "slots", &["role", "server", "group", "file", "clients", "since", "with"], slots.into_iter());
    }
    out.push_str(&panel_html(
        "negotiators",
        "Negotiators and file servers",
        &p.negotiators,
        &["role", "listens", "groups", "talks to", "process"],
        |n| {
            let process = match (n.pid, n.running) {
                (Some(pid), Some(true)) => format!("pid {pid}, {} groups in use", n.slots.len()),
                (Some(pid), _) => format!("pid {pid}, ended"),
                _ => "not reported".into(),
            };
            (format!("{}@{}", n.role, n.listen), vec![n.role.clone(), n.listen.clone(), n.groups.join(", "), n.peers.join(", "), process], Vec::new())
        },
        &after,
    ));
    out.push_str(&panel_html("nodes", "Nodes: assigned and running", &p.nodes, &["node", "MAC", "phase", "assigned", "running", "drift", "seen"], |n| {
        (
            n.name.clone(),
            vec![
                n.name.clone(),
                n.mac.clone(),
                n.phase.clone(),
                n.problem.clone().unwrap_or_else(|| n.assigned.join(", ")),
                n.running.join(", "),
                match n.drift {
                    Some(true) => "DRIFT".into(),
                    Some(false) => "in step".into(),
                    None => "not reported".into(),
                },
                when_ms(n.last_seen_ms),
            ],
            Vec::new(),
        )
    }, ""));
    out.push_str(&panel_html("caches", "Edge caches", &p.caches, &["cache", "image", "version", "sha256", "state", "changed"], |c| {
        (
            format!("{}/{}:{}", c.cache, c.name, c.version),
            vec![c.cache.clone(), c.name.clone(), c.version.to_string(), short_hash(&c.sha256).to_string(), c.state.clone(), when_ms(c.changed_ms)],
            Vec::new(),
        )
    }, ""));
    out.replace(['\n', '\r'], " ")
}

/// The dashboard's routes that need a token (the caller layers the check over them).
/// `stopping` turns true when the server stops: the event streams end then, so a browser
/// left open does not hold the listener's graceful shutdown.
pub fn routes(shared: Arc<Shared>, stopping: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/events", get(move |s| events(s, stopping.clone())))
        .route("/dashboard/client/{mac}", get(timeline))
        .route("/api/dashboard", get(rows_json))
        .with_state(shared)
}

/// The login form, reachable without a token.
pub fn login_routes(shared: Arc<Shared>) -> Router {
    Router::new().route("/dashboard/login", get(login_page).post(login)).with_state(shared)
}

/// `/api/dashboard`: the clients' rows and every panel.
#[derive(Serialize)]
struct Snapshot<'a> {
    clients: Vec<Row>,
    #[serde(flatten)]
    panels: &'a Panels,
}

async fn rows_json(State(shared): State<Arc<Shared>>) -> Response {
    let (_, panels) = current_panels(&shared).await;
    Json(Snapshot { clients: shared.board.rows(now_ms()), panels: &panels.0 }).into_response()
}

/// What one viewer's event stream was told so far.
struct Viewer {
    shared: Arc<Shared>,
    /// The board's sequence number of the last rows sent.
    since: u64,
    /// The clients it was last told are stuck.
    stuck: HashSet<String>,
    /// The generation of the panels it last got (0: none yet).
    panels: u64,
    first: bool,
    stopping: watch::Receiver<bool>,
}

/// At most one tick a second: the rows that changed (the first time: all), then the panels
/// when they changed (their HTML, as the page shows them). A quiet tick sends a comment.
async fn events(
    State(shared): State<Arc<Shared>>,
    stopping: watch::Receiver<bool>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let viewer = Viewer { shared, since: 0, stuck: HashSet::new(), panels: 0, first: true, stopping };
    let stream = futures_util::stream::unfold(viewer, |mut v| async move {
        if !v.first {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = v.stopping.wait_for(|s| *s) => return None,
            }
        }
        if *v.stopping.borrow() {
            return None;
        }
        let (rows, next) = v.shared.board.changes(v.since, &mut v.stuck, now_ms());
        let mut events = Vec::with_capacity(2);
        if v.first || !rows.is_empty() {
            events.push(Ok(Event::default().event("rows").data(serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into()))));
        }
        let (generation, panels) = current_panels(&v.shared).await;
        if generation != v.panels {
            // A JSON string: the HTML is one line, but JSON keeps the event's data safe anyway.
            events.push(Ok(Event::default().event("panels").data(serde_json::to_string(&panels.1).unwrap_or_default())));
            v.panels = generation;
        }
        if events.is_empty() {
            events.push(Ok(Event::default().comment("quiet")));
        }
        v.since = next;
        v.first = false;
        Some((futures_util::stream::iter(events), v))
    });
    Sse::new(futures_util::StreamExt::flatten(stream)).keep_alive(KeepAlive::default())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn row_html(r: &Row) -> String {
    let status = if r.stuck { "stuck" } else { match r.state { StepState::Moving => "moving", StepState::Done => "done", StepState::Failed => "failed" } };
    format!(
        "<tr id=\"c-{mac}\" data-status=\"{status}\" data-stage=\"{stage}\"><td><a href=\"/dashboard/client/{mac}\">{mac}</a></td><td>{ip}</td><td>{group}</td><td class=stage>{stage}</td><td class=status>{status}</td><td>{last}</td><td>{bytes}</td><td>{rate}</td><td>{image}</td></tr>",
        mac = esc(&r.mac),
        ip = r.ip.map(|i| i.to_string()).unwrap_or_default(),
        group = esc(r.group.as_deref().unwrap_or("")),
        stage = r.stage,
        last = esc(&format!("{} {}", r.last, r.detail)),
        bytes = human_bytes(r.sent_bytes),
        rate = r.rate.map(|b| format!("{}/s", human_bytes(b))).unwrap_or_default(),
        image = esc(r.image.as_deref().unwrap_or("")),
    )
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;width:100%}\
td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}tr[data-status=done] .status{color:#070}\
tr[data-status=failed] .status{color:#b00}tr[data-status=stuck]{background:#fff3cd}tr[data-status=stuck] .status{color:#a60;font-weight:bold}\
.panel{margin-top:2em}.panel .note{color:#555}";

/// Follows the server's events and rewrites a client's row when it changes. The rows are
/// rendered by the same rules as on the server: the event carries the row's HTML-free
/// fields, and this builds the cells with `textContent` (no HTML from the network).
const SCRIPT: &str = r#"
const human = n => n >= 1073741824 ? (n/1073741824).toFixed(1)+' GiB' : n >= 1048576 ? (n/1048576).toFixed(1)+' MiB' : n >= 1024 ? (n/1024).toFixed(1)+' KiB' : n+' B';
function render(r) {
  const status = r.stuck ? 'stuck' : r.state;
  let tr = document.getElementById('c-' + r.mac);
  if (!tr) { tr = document.createElement('tr'); tr.id = 'c-' + r.mac; document.getElementById('rows').prepend(tr); }
  tr.dataset.status = status; tr.dataset.stage = r.stage;
  tr.replaceChildren();
  const cell = (text, cls) => { const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; };
  const a = document.createElement('a'); a.href = '/dashboard/client/' + r.mac; a.textContent = r.mac;
  cell('').appendChild(a);
  cell(r.ip || ''); cell(r.group || ''); cell(r.stage, 'stage'); cell(status, 'status');
  cell(r.last + ' ' + r.detail); cell(human(r.sent_bytes)); cell(r.rate == null ? '' : human(r.rate) + '/s'); cell(r.image || '');
}
const es = new EventSource('/dashboard/events');
es.addEventListener('rows', e => { JSON.parse(e.data).forEach(render); document.getElementById('live').textContent = 'live'; });
// The panels arrive rendered and escaped by the server, as in the page it sent.
es.addEventListener('panels', e => { document.getElementById('panels').innerHTML = JSON.parse(e.data); });
es.onerror = () => { document.getElementById('live').textContent = 'reconnecting'; };
"#;

async fn page(State(shared): State<Arc<Shared>>) -> Html<String> {
    let rows: String = shared.board.rows(now_ms()).iter().map(row_html).collect();
    let (_, panels) = current_panels(&shared).await;
    let panels = &panels.1;
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>fleetboot — clients</title><style>{STYLE}</style></head><body>\
<h1>fleetboot: clients booting</h1><p>Updates: <span id=live>connecting</span>. A client is <b>stuck</b> when it has been quiet for {stuck} s in the middle of a step.</p>\
<table><thead><tr><th>MAC</th><th>IP</th><th>group</th><th>stage</th><th>status</th><th>latest</th><th>sent</th><th>rate</th><th>image</th></tr></thead><tbody id=rows>{rows}</tbody></table>\
<div id=panels>{panels}</div><script>{SCRIPT}</script></body></html>",
        stuck = shared.board.stuck_after_ms / 1000,
    ))
}

async fn timeline(State(shared): State<Arc<Shared>>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return (StatusCode::NOT_FOUND, "not a MAC address").into_response();
    };
    let events = match shared.store.trace(&mac.to_string(), 1000) {
        Ok(e) => e,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("reading the trace: {e}")).into_response(),
    };
    let first = events.first().map_or(0, |e| e.ts_ms);
    let items: String = events
        .iter()
        .map(|e| format!("<tr class=event><td>+{:.3} s</td><td>{}</td><td>{}</td></tr>", (e.ts_ms - first) as f64 / 1000.0, esc(&e.kind), esc(&e.detail)))
        .collect();
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>fleetboot — {mac}</title><style>{STYLE}</style></head><body>\
<p><a href=/dashboard>all clients</a></p><h1>{mac}: its boot, event by event</h1><table id=timeline><thead><tr><th>when</th><th>event</th><th>detail</th></tr></thead><tbody>{items}</tbody></table></body></html>"
    ))
    .into_response()
}

const LOGIN_FORM: &str = "<form method=post action=/dashboard/login><label>API token <input type=password name=token autocomplete=off></label> <button type=submit>Open the dashboard</button></form>";

async fn login_page() -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>fleetboot — sign in</title><style>{STYLE}</style></head><body><h1>fleetboot</h1>\
<p>A token of role <code>read</code> or <code>admin</code> (<code>fleetboot token create NAME --role read</code>). It is kept in a cookie this browser sends only to this server, and the dashboard can only read.</p>{LOGIN_FORM}</body></html>"
    ))
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// Checks the token like any API request would, then hands it to the browser as a cookie.
async fn login(State(shared): State<Arc<Shared>>, Form(form): Form<Login>) -> Response {
    let mut headers = HeaderMap::new();
    let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", form.token.trim())) else {
        return (StatusCode::UNAUTHORIZED, Html(format!("<p>That is not a token.</p>{LOGIN_FORM}"))).into_response();
    };
    headers.insert(header::AUTHORIZATION, value);
    match authenticate(&shared.store, &headers, Role::Read) {
        Ok(Ok(_)) => {}
        Ok(Err(f)) => {
            metrics::counter!("fleetboot_api_auth_failures_total", "reason" => f.label()).increment(1);
            return (StatusCode::UNAUTHORIZED, Html(format!("<p>Refused: {}.</p>{LOGIN_FORM}", esc(f.label())))).into_response();
        }
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("cannot check tokens right now: {e:#}")).into_response(),
    }
    let secure = if shared.config.admin.as_ref().is_some_and(|a| a.tls.is_some()) { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", form.token.trim());
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn a_boot_moves_through_its_stages() {
        let b = Board::new(10, Duration::from_secs(30));
        b.observe(mac(1), Some("lab"), "DHCPACK", "10.0.0.5 file=undionly.kpxe", 1_000);
        let r = &b.rows(1_000)[0];
        assert_eq!((r.stage, r.state, r.ip), ("DHCP", StepState::Moving, Some(Ipv4Addr::new(10, 0, 0, 5))));
        assert_eq!(r.group.as_deref(), Some("lab"));
        b.observe(mac(1), Some("lab"), "TFTP-RRQ", "undionly.kpxe 100000 bytes asked [] granted []", 2_000);
        b.observe(mac(1), Some("lab"), "TFTP-DONE", "undionly.kpxe 100000 bytes in 0.5s, 0 retransmits", 2_500);
        let r = &b.rows(2_500)[0];
        assert_eq!((r.stage, r.state, r.sent_bytes, r.file_bytes, r.rate), ("TFTP", StepState::Done, 100_000, Some(100_000), Some(200_000)));
        b.observe(mac(1), Some("lab"), "HTTP-IMAGE", "/images/base (sha256:ab) 4096 bytes", 3_000);
        let r = &b.rows(3_000)[0];
        assert_eq!((r.stage, r.sent_bytes, r.image.as_deref()), ("HTTP", 104_096, Some("/images/base (sha256:ab)")));
        b.observe(mac(1), None, "TFTP-REFUSED", "x: no", 3_100);
        assert_eq!(b.rows(3_100)[0].state, StepState::Failed);
    }

    #[test]
    fn quiet_in_the_middle_of_a_step_is_stuck_quiet_after_it_is_not() {
        let b = Board::new(10, Duration::from_secs(30));
        b.observe(mac(1), None, "DHCPACK", "10.0.0.5", 0);
        b.observe(mac(2), None, "TFTP-DONE", "f 10 bytes in 0.1s", 0);
        let rows = b.rows(30_001);
        let stuck: Vec<_> = rows.iter().filter(|r| r.stuck).map(|r| r.mac.clone()).collect();
        assert_eq!(stuck, [mac(1).to_string()]);
        assert!(!b.rows(30_000).iter().any(|r| r.stuck), "not before the limit");
    }

    #[test]
    fn a_viewer_gets_each_change_once_and_stuck_flips_without_new_events() {
        let b = Board::new(10, Duration::from_secs(5));
        let mut stuck = HashSet::new();
        b.observe(mac(1), None, "DHCPACK", "10.0.0.5", 0);
        for i in 0..1000 {
            b.observe(mac(2), None, "TFTP-RRQ", "f 1 bytes", i);
        }
        let (rows, seq) = b.changes(0, &mut stuck, 1_000);
        assert_eq!(rows.len(), 2, "a thousand events of one client are one row");
        let (rows, seq) = b.changes(seq, &mut stuck, 2_000);
        assert!(rows.is_empty(), "nothing changed: nothing sent");
        let (rows, seq) = b.changes(seq, &mut stuck, 6_000);
        assert_eq!(rows.iter().map(|r| (r.mac.clone(), r.stuck)).collect::<Vec<_>>().len(), 2, "both went stuck");
        assert!(rows.iter().all(|r| r.stuck));
        let (rows, seq) = b.changes(seq, &mut stuck, 7_000);
        assert!(rows.is_empty(), "still stuck: told once");
        b.observe(mac(1), None, "TFTP-DONE", "f 1 bytes in 0.1s", 7_500);
        let (rows, _) = b.changes(seq, &mut stuck, 7_600);
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].stuck && rows[0].state == StepState::Done);
    }

    #[test]
    fn the_board_is_bounded_and_the_quietest_client_makes_room() {
        let b = Board::new(3, Duration::from_secs(5));
        for n in 1..=3 {
            b.observe(mac(n), None, "DHCPACK", "10.0.0.5", n as u64);
        }
        b.observe(mac(1), None, "TFTP-RRQ", "f 1 bytes", 10);
        b.observe(mac(4), None, "DHCPACK", "10.0.0.9", 11);
        let mut macs: Vec<_> = b.rows(11).into_iter().map(|r| r.mac).collect();
        macs.sort();
        assert_eq!(macs, [mac(1).to_string(), mac(3).to_string(), mac(4).to_string()]);
    }

    #[test]
    fn panels_are_escaped_bounded_and_say_why_they_are_empty() {
        let dir = std::env::temp_dir().join(format!("fb-dash-panels-{}", std::process::id()));
        let empty = images_panel(&dir);
        std::fs::remove_dir_all(&dir).ok();
        assert!(empty.configured && empty.items.is_empty() && empty.note.as_deref().unwrap().contains("image import"), "{empty:?}");

        let cache = |n: usize| CacheItem {
            cache: format!("<b>{n}</b>"),
            name: "img\"x".into(),
            version: 1,
            sha256: "ab".repeat(32),
            state: "verified".into(),
            changed_ms: 0,
        };
        let caches = Panel::of((0..PANEL_MAX_ITEMS + 3).map(cache).collect(), None);
        assert_eq!((caches.items.len(), caches.more), (PANEL_MAX_ITEMS, 3));
        let why = "No <x> here\nat all";
        let p = Panels { images: empty, streams: Panel::off(why), negotiators: Panel::off(why), nodes: Panel::off(why), caches };
        let html = panels_html(&p);
        assert!(!html.contains("<b>") && html.contains("&lt;b&gt;0&lt;/b&gt;") && !html.contains("<x>"), "{html}");
        assert!(!html.contains('\n'), "one line: it travels in one event");
        assert!(html.contains("id=panel-streams class=panel data-configured=false") && html.contains("and 3 more"), "{html}");
        assert!(html.contains("data-key=\"&lt;b&gt;1&lt;/b&gt;/img&quot;x:1\""), "{html}");
    }

    fn config(extra: &str) -> crate::config::Config {
        let text = format!(
            "data_dir = \"/nonexistent\"\n[server]\naddress = \"10.0.0.1\"\ninterface = \"lo\"\nroot = \"/nonexistent\"\n[dhcp]\nmode = \"off\"\n{extra}"
        );
        crate::config::Config::parse(&text, std::path::Path::new("/")).unwrap()
    }

    fn seen(role: &str, pid: u32, running: bool) -> crate::status::Seen {
        crate::status::Seen {
            report: crate::status::Report { role: role.into(), pid, server: "10.0.0.9".into(), updated_ms: 1, streams: Vec::new(), slots: Vec::new() },
            running,
        }
    }

    fn stream(image: &str, sent: u64) -> crate::status::StreamLive {
        crate::status::StreamLive {
            image: image.into(),
            session: "0000abcd".into(),
            group: "239.255.1.1:9000".into(),
            state: "sending".into(),
            receivers: 3,
            complete: 1,
            repairs: 7,
            rounds: 1,
            bytes_sent: sent,
            image_size: 1000,
        }
    }

    #[test]
    fn stream_sessions_show_their_senders_figures() {
        let none = config("");
        assert!(!streams_panel(&none, &[]).configured, "nothing configured, nothing reported");
        let cfg = config("[stream]\n[[stream.session]]\nimage = \"disk\"\n[[stream.session]]\nimage = \"other\"\n");
        let mut sender = seen("stream", 42, true);
        sender.report.streams = vec![stream("disk", 1_250), stream("elsewhere", 10)];
        let p = streams_panel(&cfg, &[sender.clone()]);
        let figures: Vec<_> = p.items.iter().map(|i| (i.image.as_str(), i.configured, i.live.as_ref().map(|l| (l.status.bytes_sent, l.egress_ratio)))).collect();
        assert_eq!(figures, [("disk", true, Some((1_250, 1.25))), ("other", true, None), ("elsewhere", false, Some((10, 0.01)))]);
        // A sender of another config is shown where no [stream] section is.
        let p = streams_panel(&none, &[sender]);
        assert!(p.configured && p.items.len() == 2 && p.note.is_none(), "{p:?}");
        let html = panels_html(&Panels { images: Panel::off("x"), streams: p, negotiators: Panel::off("x"), nodes: Panel::off("x"), caches: Panel::off("x") });
        assert!(html.contains("data-key=\"disk\" data-state=\"sending\" data-receivers=\"3\" data-complete=\"1\" data-repairs=\"7\" data-bytes=\"1250\""), "{html}");
    }

    #[test]
    fn negotiators_and_file_servers_show_their_groups_bounded() {
        let slot = |n: u64| crate::status::SlotLive { group: format!("239.1.1.{}:1758", n % 250), file: format!("f{n}"), clients: n, since_ms: 1, with: "x".into() };
        let cfg = config("[files]\n");
        let mut own = seen("file server", 7, true);
        own.report.slots = vec![slot(1)];
        let mut other = seen("negotiator", 8, false);
        other.report.slots = (0..PANEL_MAX_ITEMS as u64 + 10).map(slot).collect();
        let p = negotiators_panel(&cfg, &[own, other, seen("stream", 9, true)], 7);
        assert_eq!(p.items.len(), 2, "{p:?}");
        assert_eq!((p.items[0].role.as_str(), p.items[0].pid, p.items[0].slots.len()), ("file server", Some(7), 1));
        assert_eq!((p.items[1].role.as_str(), p.items[1].running, p.items[1].slots.len()), ("negotiator", Some(false), PANEL_MAX_ITEMS - 1));
        assert_eq!(p.more, 11, "slots beyond the panel's bound are counted");
        assert!(!negotiators_panel(&config(""), &[], 7).configured);
        let html = panels_html(&Panels { images: Panel::off("x"), streams: Panel::off("x"), negotiators: p, nodes: Panel::off("x"), caches: Panel::off("x") });
        assert!(html.contains("<tr data-key=\"file server/239.1.1.1:1758/f1\" data-clients=\"1\">"), "{html}");
    }

    #[test]
    fn html_from_the_network_is_escaped() {
        let b = Board::new(3, Duration::from_secs(5));
        b.observe(mac(1), None, "TFTP-REFUSED", "<script>alert(1)</script>: no", 1);
        let html = row_html(&b.rows(1)[0]);
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"), "{html}");
    }
}

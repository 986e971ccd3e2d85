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
}

impl Board {
    pub fn new(max_clients: usize, stuck_after: Duration) -> Board {
        Board {
            inner: Mutex::new(Inner { rows: HashMap::new(), seq: 0 }),
            max_clients: max_clients.max(1),
            stuck_after_ms: stuck_after.as_millis() as u64,
            evictions_logged: LogLimit::new(Duration::from_secs(10)),
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

async fn rows_json(State(shared): State<Arc<Shared>>) -> Json<Vec<Row>> {
    Json(shared.board.rows(now_ms()))
}

/// At most one event a second, carrying only the rows that changed (the first one: all).
async fn events(
    State(shared): State<Arc<Shared>>,
    stopping: watch::Receiver<bool>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let state = (shared, 0u64, HashSet::<String>::new(), true, stopping);
    let stream = futures_util::stream::unfold(state, |(shared, since, mut stuck, first, mut stopping)| async move {
        if !first {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopping.wait_for(|s| *s) => return None,
            }
        }
        if *stopping.borrow() {
            return None;
        }
        let (rows, next) = shared.board.changes(since, &mut stuck, now_ms());
        let event = if first || !rows.is_empty() {
            Event::default().event("rows").data(serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into()))
        } else {
            Event::default().comment("quiet")
        };
        Some((Ok(event), (shared, next, stuck, false, stopping)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
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
tr[data-status=failed] .status{color:#b00}tr[data-status=stuck]{background:#fff3cd}tr[data-status=stuck] .status{color:#a60;font-weight:bold}";

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
es.onerror = () => { document.getElementById('live').textContent = 'reconnecting'; };
"#;

async fn page(State(shared): State<Arc<Shared>>) -> Html<String> {
    let rows: String = shared.board.rows(now_ms()).iter().map(row_html).collect();
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>fleetboot — clients</title><style>{STYLE}</style></head><body>\
<h1>fleetboot: clients booting</h1><p>Updates: <span id=live>connecting</span>. A client is <b>stuck</b> when it has been quiet for {stuck} s in the middle of a step.</p>\
<table><thead><tr><th>MAC</th><th>IP</th><th>group</th><th>stage</th><th>status</th><th>latest</th><th>sent</th><th>rate</th><th>image</th></tr></thead><tbody id=rows>{rows}</tbody></table>\
<script>{SCRIPT}</script></body></html>",
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
    fn html_from_the_network_is_escaped() {
        let b = Board::new(3, Duration::from_secs(5));
        b.observe(mac(1), None, "TFTP-REFUSED", "<script>alert(1)</script>: no", 1);
        let html = row_html(&b.rows(1)[0]);
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"), "{html}");
    }
}

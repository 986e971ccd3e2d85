//! One emulated client, start to finish: DHCP through the shared socket, its leased address
//! on the interface, then the boot plan (script, kernel, initrd) from that address — or, as
//! a PXE ROM, boot server discovery and the boot file over PXE MTFTP.

use crate::net::Addresses;
use crate::pxe::{self, PxeClientConfig};
use crate::report::{ClientReport, FileReport, Phase, PxeReport};
use crate::script::{self, Vars};
use crate::sink::{hex, Fetched, Sink};
use crate::tftp::{TftpParams, TftpStats};
use crate::url::{join, resolve, Location};
use crate::{BootMode, PxeMtftp};
use fleetboot_dhcp::client::{ClientConfig, ClientEvent, DhcpClient};
use fleetboot_dhcp::Binding;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Scripts chaining scripts: at most this deep.
const MAX_CHAIN: usize = 4;

/// How long a PXE client bound without a ProxyDHCP offer still waits for one.
const PROXY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) type Slot = Arc<Mutex<ClientReport>>;

/// A DHCP reply for one client, from the shared socket's demultiplexer.
pub(crate) type Reply = (SocketAddr, Vec<u8>);

pub(crate) fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, ClientReport> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every client shares.
pub(crate) struct Ctx {
    pub sock: Arc<UdpSocket>,
    pub addrs: Arc<Addresses>,
    pub tftp: TftpParams,
    /// File name → SHA-256 every client must fetch identically.
    pub expected: Vec<(String, [u8; 32])>,
    pub mode: BootMode,
    /// The run's global timeout, as an instant (blocking PXE clients get what is left).
    pub deadline: Instant,
    /// Set when the run stops; blocking PXE clients watch it.
    pub cancel: Arc<AtomicBool>,
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

/// Runs one client; returns its DHCP machine if it holds a lease (to release it later).
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    config: ClientConfig,
    xid: u32,
    start_at: tokio::time::Instant,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    slot: Slot,
) -> Option<DhcpClient> {
    tokio::time::sleep_until(start_at).await;
    let t0 = Instant::now();
    lock(&slot).phase = Phase::Dhcp;
    let mut client = DhcpClient::new(config, xid, t0);
    let binding = match dhcp(&ctx, &mut client, &mut rx, &slot, t0).await {
        Ok(b) => b,
        Err(e) => {
            lock(&slot).error = Some(e);
            return None;
        }
    };
    // A ProxyDHCP offer answers the same DISCOVER as the server's OFFER and may come after
    // the ACK (another server, busy): like a PXE ROM, which keeps collecting offers when
    // the address offer carries no boot servers, the client waits a while for one unless
    // it was told whom to ask.
    let binding = match &ctx.mode {
        BootMode::PxeMtftp(p) => {
            let until = tokio::time::Instant::now() + PROXY_WAIT;
            loop {
                while let Ok((from, bytes)) = rx.try_recv() {
                    client.handle(Instant::now(), from, &bytes);
                }
                if client.proxy_offer().is_some() || !p.boot_servers.is_empty() {
                    break;
                }
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some((from, bytes))) => client.handle(Instant::now(), from, &bytes),
                    Ok(None) | Err(_) => break,
                }
            }
            client.binding().cloned().unwrap_or(binding)
        }
        BootMode::Ipxe => binding,
    };
    drop(rx);
    {
        let mut r = lock(&slot);
        r.ip = Some(binding.ip);
        r.boot_file = binding.boot_file.clone();
        r.phase = Phase::Address;
    }
    if let Err(e) = ctx.addrs.add(binding.ip, binding.prefix_len).await {
        lock(&slot).error = Some(e);
        return Some(client);
    }
    lock(&slot).timeline.address_ms = Some(ms(t0));
    let booted = match &ctx.mode {
        BootMode::Ipxe => boot(&ctx, &client, &binding, &slot, t0).await,
        BootMode::PxeMtftp(p) => pxe_boot(&ctx, &client, &binding, p, &slot, t0).await,
    };
    match booted {
        Ok(()) => {
            let mut r = lock(&slot);
            r.phase = Phase::Done;
            r.timeline.total_ms = Some(ms(t0));
        }
        Err(e) => lock(&slot).error = Some(e),
    }
    Some(client)
}

fn transient(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock
}

async fn dhcp(
    ctx: &Ctx,
    c: &mut DhcpClient,
    rx: &mut mpsc::UnboundedReceiver<Reply>,
    slot: &Slot,
    t0: Instant,
) -> Result<Binding, String> {
    let mut buf = Vec::with_capacity(600);
    loop {
        loop {
            buf.clear();
            let discovers = c.stats().discovers;
            let Some(t) = c.poll_transmit(Instant::now(), &mut buf) else { break };
            if c.stats().discovers > discovers {
                lock(slot).timeline.discover_ms.get_or_insert(ms(t0));
            }
            match ctx.sock.send_to(&buf, t.destination).await {
                Ok(_) => {}
                // Lost, as far as the client knows: its timer resends.
                Err(e) if transient(&e) => tracing::debug!(error = %e, "DHCP send dropped"),
                Err(e) => return Err(format!("sending to {}: {e}", t.destination)),
            }
        }
        let mut failed = None;
        {
            let mut r = lock(slot);
            while let Some(ev) = c.poll_event() {
                match ev {
                    ClientEvent::Offered { .. } => {
                        r.timeline.offer_ms.get_or_insert(ms(t0));
                    }
                    ClientEvent::Bound(_) => r.timeline.ack_ms = Some(ms(t0)),
                    ClientEvent::Failed(e) => failed = Some(e.to_string()),
                    ClientEvent::Nak { message } => {
                        tracing::debug!(mac = %c.mac(), ?message, "DHCPNAK; starting over")
                    }
                    ClientEvent::RequestTimedOut => {
                        tracing::debug!(mac = %c.mac(), "DHCPREQUEST unanswered; starting over")
                    }
                }
            }
            let s = c.stats();
            r.dhcp.discovers = s.discovers;
            r.dhcp.requests = s.requests;
            r.dhcp.retransmits = s.retransmits;
            r.dhcp.naks = s.naks;
            r.dhcp.restarts = s.restarts;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(b) = c.binding() {
            return Ok(b.clone());
        }
        let Some(deadline) = c.poll_timeout() else {
            return Err(format!("DHCP stopped in state {:?}", c.state()));
        };
        tokio::select! {
            m = rx.recv() => match m {
                Some((from, bytes)) => c.handle(Instant::now(), from, &bytes),
                None => return Err("the DHCP receiver stopped".into()),
            },
            _ = tokio::time::sleep_until(deadline.into()) => c.handle_timeout(Instant::now()),
        }
    }
}

/// Fetches one file from `local`; the TFTP timeouts are counted in the slot either way.
async fn fetch(
    ctx: &Ctx,
    local: Ipv4Addr,
    loc: &Location,
    keep: bool,
    slot: &Slot,
) -> Result<(Fetched, u64), String> {
    lock(slot).current = Some(loc.to_string());
    let mut sink = Sink::new(keep);
    let timeouts = match loc {
        Location::Http { .. } => {
            crate::http::get(Some(local), &loc.to_string(), &mut sink).await?;
            0
        }
        Location::Tftp { host, port, file } => {
            let server = resolve(host, *port).await?;
            let mut stats = TftpStats::default();
            let r = crate::tftp::get(local, server, file, &ctx.tftp, &mut sink, &mut stats).await;
            lock(slot).tftp_timeouts += stats.timeouts;
            r?;
            stats.timeouts
        }
    };
    lock(slot).current = None;
    Ok((sink.finish(), timeouts))
}

async fn boot(
    ctx: &Ctx,
    client: &DhcpClient,
    b: &Binding,
    slot: &Slot,
    t0: Instant,
) -> Result<(), String> {
    let mac = client.mac();
    let uuid = client.config().uuid;
    let vars = Vars {
        mac: mac.to_string(),
        mac_hyphen: mac.hyphenated(),
        ip: b.ip.to_string(),
        next_server: b.next_server.unwrap_or(b.server_id).to_string(),
        uuid: fleetboot_boot::format_pxe_uuid(&uuid),
    };
    let first = b
        .boot_file
        .as_deref()
        .ok_or("the DHCP server gave no boot file (does a profile match this client?)")?;
    let mut loc = Location::parse(first, Some(b.next_server.unwrap_or(b.server_id)))?;
    let mut role = "script".to_string();
    let mut seen = Vec::new();
    lock(slot).phase = Phase::Script;
    for depth in 0..=MAX_CHAIN {
        // Whatever this is, it may be a script: keep it (if small).
        let (f, timeouts) = fetch(ctx, b.ip, &loc, true, slot)
            .await
            .map_err(|e| format!("{loc}: {e}"))?;
        let data = f.data.clone();
        record(ctx, slot, &role, &loc, &f, timeouts, t0, &mut seen)?;
        let Some(text) = data.filter(|d| script::is_script(d)) else {
            // An image, not a script: that was the boot.
            return check_expected(ctx, &seen);
        };
        lock(slot).timeline.script_ms.get_or_insert(ms(t0));
        let s = script::parse(&String::from_utf8_lossy(&text), &vars)
            .map_err(|e| format!("{loc}: {e}"))?;
        if let Some(why) = s.exit {
            return Err(format!("{loc}: {why}"));
        }
        if s.fetches.is_empty() {
            return Err(format!("{loc}: the script fetches nothing"));
        }
        lock(slot).phase = Phase::Files;
        let (images, chain) = match s.chains {
            true => s.fetches.split_at(s.fetches.len() - 1),
            false => (&s.fetches[..], &[][..]),
        };
        for img in images {
            let url = join(&loc, &img.url);
            let l = Location::parse(&url, None)?;
            let (f, timeouts) = fetch(ctx, b.ip, &l, false, slot)
                .await
                .map_err(|e| format!("{l}: {e}"))?;
            record(ctx, slot, &img.command, &l, &f, timeouts, t0, &mut seen)?;
        }
        let Some(next) = chain.first() else {
            return check_expected(ctx, &seen);
        };
        if depth == MAX_CHAIN {
            break;
        }
        role = next.command.clone();
        loc = Location::parse(&join(&loc, &next.url), None)?;
    }
    Err(format!("scripts chain more than {MAX_CHAIN} deep"))
}

#[allow(clippy::too_many_arguments)]
fn record(
    ctx: &Ctx,
    slot: &Slot,
    role: &str,
    loc: &Location,
    f: &Fetched,
    timeouts: u64,
    t0: Instant,
    seen: &mut Vec<String>,
) -> Result<(), String> {
    let file = FileReport {
        role: role.to_string(),
        url: loc.to_string(),
        transport: if loc.is_http() { "http" } else { "tftp" },
        bytes: f.bytes,
        sha256: hex(&f.sha256),
        done_ms: ms(t0),
        verified: false,
        tftp_timeouts: timeouts,
    };
    record_file(ctx, slot, loc.file_name(), file, &f.sha256, seen)
}

/// Checks a fetched file against `--expect` (by `name`) and adds it to the report.
fn record_file(
    ctx: &Ctx,
    slot: &Slot,
    name: &str,
    mut file: FileReport,
    sha256: &[u8; 32],
    seen: &mut Vec<String>,
) -> Result<(), String> {
    if let Some((_, want)) = ctx.expected.iter().find(|(n, _)| n == name) {
        if want != sha256 {
            return Err(format!(
                "{}: SHA-256 {} differs from the expected {} ({} bytes)",
                file.url,
                file.sha256,
                hex(want),
                file.bytes
            ));
        }
        file.verified = true;
    }
    seen.push(name.to_string());
    lock(slot).files.push(file);
    Ok(())
}

/// The name `--expect` knows a PXE boot file by: its last path segment (PXE file names
/// use either separator).
fn pxe_file_name(file: &str) -> &str {
    file.rsplit(['/', '\\']).next().unwrap_or(file)
}

/// A PXE ROM after DHCP: boot server discovery, then the boot file over PXE MTFTP, on a
/// blocking thread ([`pxe::discover_and_fetch_with`]); what happens lands in the slot as it
/// happens.
async fn pxe_boot(
    ctx: &Ctx,
    client: &DhcpClient,
    b: &Binding,
    mode: &PxeMtftp,
    slot: &Slot,
    t0: Instant,
) -> Result<(), String> {
    let plan = pxe::plan_discovery(b, &mode.boot_servers, mode.boot_type);
    if plan.servers.is_empty() {
        return Err(
            "no boot server to ask (no --boot-server, ProxyDHCP offer or DHCP server address)"
                .into(),
        );
    }
    {
        let mut r = lock(slot);
        r.phase = Phase::Discovery;
        r.pxe = Some(PxeReport::new(&plan, b.proxy.as_ref().map(|p| p.server)));
    }
    let mut cfg = PxeClientConfig::new(
        b.ip,
        client.mac(),
        &plan.servers,
        plan.boot_type,
        ctx.deadline.saturating_duration_since(Instant::now()),
    );
    cfg.uuid = Some(client.config().uuid);
    // Random per client already; a boot server sees a new transaction after DHCP's.
    cfg.xid = client.xid().rotate_left(16);
    // Hashed as it completes; a storm of clients must not keep every copy.
    cfg.keep_data = false;
    cfg.cancel = Some(ctx.cancel.clone());
    let live = slot.clone();
    let fetched = tokio::task::spawn_blocking(move || {
        pxe::discover_and_fetch_with(&cfg, |e| {
            let mut r = lock(&live);
            let at = ms(t0);
            match &e {
                pxe::PxeEvent::Answered {
                    file, file_server, ..
                } => {
                    r.phase = Phase::Files;
                    r.current = Some(format!("mtftp://{file_server}/{file}"));
                }
                pxe::PxeEvent::Stalled(_) => r.phase = Phase::Discovery,
                _ => {}
            }
            if let Some(p) = r.pxe.as_mut() {
                p.apply(&e, at);
            }
        })
    })
    .await
    .map_err(|e| format!("the PXE client thread ended: {e}"))?;
    let f = match fetched {
        Ok(f) => f,
        Err(e) => {
            if let Some(p) = lock(slot).pxe.as_mut() {
                p.waits = e.waits;
                p.answers = e.answers;
            }
            return Err(format!("PXE MTFTP: {e}"));
        }
    };
    let done = ms(t0);
    {
        let mut r = lock(slot);
        r.current = None;
        if let Some(p) = r.pxe.as_mut() {
            p.finish(&f, done);
        }
    }
    let file = FileReport {
        role: "boot".into(),
        url: format!("mtftp://{}/{}", f.file_server, f.file),
        transport: "mtftp",
        bytes: f.len,
        sha256: hex(&f.sha256),
        done_ms: done,
        verified: false,
        tftp_timeouts: 0,
    };
    let mut seen = Vec::new();
    record_file(
        ctx,
        slot,
        pxe_file_name(&f.file),
        file,
        &f.sha256,
        &mut seen,
    )?;
    check_expected(ctx, &seen)
}

fn check_expected(ctx: &Ctx, seen: &[String]) -> Result<(), String> {
    for (name, _) in &ctx.expected {
        if !seen.contains(name) {
            return Err(format!("the boot never fetched the expected file {name:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pxe_files_are_expected_by_their_last_segment() {
        assert_eq!(pxe_file_name("bios/pxelinux.0"), "pxelinux.0");
        assert_eq!(pxe_file_name("boot\\x64\\wdsnbp.com"), "wdsnbp.com");
        assert_eq!(pxe_file_name("pxelinux.0"), "pxelinux.0");
        assert_eq!(pxe_file_name("dir/"), "");
    }
}

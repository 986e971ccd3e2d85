//! One emulated client, start to finish: its own address leased through the run's
//! [`AddrPool`] as itself (DHCP, ARP probe, netlink install — each step timed), then the
//! boot plan (script, kernel, initrd) from that address — or, as a PXE ROM, boot server
//! discovery and the boot file over PXE MTFTP.

use crate::pxe::{self, PxeClientConfig};
use crate::report::{ClientReport, FileReport, Phase, PxeReport};
use crate::script::{self, Vars};
use crate::sink::{hex, Fetched, Sink};
use crate::tftp::{TftpParams, TftpStats};
use crate::url::{join, resolve, Location};
use crate::stream::StreamBoot;
use crate::{BootMode, PxeMtftp};
use fleetboot_addr::{AddrPool, DhcpObserver, DhcpStep, Origin, OwnedAddr};
use fleetboot_dhcp::client::{ClientConfig, ClientEvent, DhcpClient};
use fleetboot_dhcp::codec::MessageType;
use fleetboot_dhcp::Binding;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// Scripts chaining scripts: at most this deep.
const MAX_CHAIN: usize = 4;

/// How long a PXE client bound without a ProxyDHCP offer still waits for one.
const PROXY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) type Slot = Arc<Mutex<ClientReport>>;

pub(crate) fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, ClientReport> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every client shares.
pub(crate) struct Ctx {
    pub pool: AddrPool,
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

/// Times the client's DHCP steps into its slot as the pool runs them, and publishes its
/// binding once a ProxyDHCP offer has reached it (a PXE ROM waits for one).
fn observer(slot: Slot, t0: Instant, proxied: watch::Sender<Option<Binding>>) -> DhcpObserver {
    Arc::new(move |c: &DhcpClient, step: DhcpStep<'_>| {
        {
            let mut r = lock(&slot);
            match step {
                DhcpStep::Sent(t) if t.message_type == MessageType::Discover => {
                    r.timeline.discover_ms.get_or_insert(ms(t0));
                }
                DhcpStep::Event(ClientEvent::Offered { .. }) => {
                    r.timeline.offer_ms.get_or_insert(ms(t0));
                }
                // The first ACK; later ones are renewals.
                DhcpStep::Event(ClientEvent::Bound(b)) if r.timeline.ack_ms.is_none() => {
                    r.timeline.ack_ms = Some(ms(t0));
                    r.ip = Some(b.ip);
                    r.boot_file = b.boot_file.clone();
                    r.phase = Phase::Address;
                }
                DhcpStep::Event(ClientEvent::Nak { message }) => {
                    tracing::debug!(mac = %c.mac(), ?message, "DHCPNAK; starting over")
                }
                DhcpStep::Event(ClientEvent::RequestTimedOut) => {
                    tracing::debug!(mac = %c.mac(), "DHCPREQUEST unanswered; starting over")
                }
                _ => {}
            }
            let s = c.stats();
            r.dhcp.discovers = s.discovers;
            r.dhcp.requests = s.requests;
            r.dhcp.retransmits = s.retransmits;
            r.dhcp.naks = s.naks;
            r.dhcp.restarts = s.restarts;
        }
        if let Some(b) = c.binding().filter(|b| b.proxy.is_some()) {
            proxied.send_if_modified(|seen| {
                let new = seen.is_none();
                if new {
                    *seen = Some(b.clone());
                }
                new
            });
        }
    })
}

/// Runs one client; returns its address, held until the run ends (every client's address
/// stays on the interface until then, as its machine would keep it).
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    config: ClientConfig,
    xid: u32,
    start_at: tokio::time::Instant,
    slot: Slot,
) -> Option<OwnedAddr> {
    tokio::time::sleep_until(start_at).await;
    let t0 = Instant::now();
    lock(&slot).phase = Phase::Dhcp;
    let (proxied_tx, mut proxied) = watch::channel(None);
    let addr = match ctx.pool.lease_observed(config.clone(), observer(slot.clone(), t0, proxied_tx)).await {
        Ok(a) => a,
        Err(e) => {
            lock(&slot).error = Some(e.to_string());
            return None;
        }
    };
    lock(&slot).timeline.address_ms = Some(ms(t0));
    let Origin::Dhcp { binding, .. } = addr.origin() else {
        lock(&slot).error = Some("the address pool gave a static address, not a lease".into());
        return Some(addr);
    };
    let mut binding = (**binding).clone();
    // A ProxyDHCP offer answers the same DISCOVER as the server's OFFER and may come after
    // the ACK (another server, busy): like a PXE ROM, which keeps collecting offers when
    // the address offer carries no boot servers, the client waits a while for one unless
    // it was told whom to ask.
    if let BootMode::PxeMtftp(p) = &ctx.mode {
        if binding.proxy.is_none() && p.boot_servers.is_empty() {
            let heard = tokio::time::timeout(PROXY_WAIT, proxied.wait_for(Option::is_some)).await;
            if let Ok(Ok(b)) = heard {
                binding.proxy = b.as_ref().and_then(|b| b.proxy.clone());
            }
        }
    }
    {
        let mut r = lock(&slot);
        r.ip = Some(binding.ip);
        r.boot_file = binding.boot_file.clone();
    }
    let booted = match &ctx.mode {
        BootMode::Ipxe => boot(&ctx, &config, &binding, &slot, t0).await,
        BootMode::PxeMtftp(p) => pxe_boot(&ctx, &config, xid, &binding, p, &slot, t0).await,
        BootMode::Stream(s) => stream_boot(&ctx, &binding, s, &slot, t0).await,
    };
    match booted {
        Ok(()) => {
            let mut r = lock(&slot);
            r.phase = Phase::Done;
            r.timeline.total_ms = Some(ms(t0));
        }
        Err(e) => lock(&slot).error = Some(e),
    }
    Some(addr)
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
    client: &ClientConfig,
    b: &Binding,
    slot: &Slot,
    t0: Instant,
) -> Result<(), String> {
    let mac = client.mac;
    let uuid = client.uuid;
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
    client: &ClientConfig,
    xid: u32,
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
        client.mac,
        &plan.servers,
        plan.boot_type,
        ctx.deadline.saturating_duration_since(Instant::now()),
    );
    cfg.uuid = Some(client.uuid);
    // Random per client; a boot server sees a transaction of its own, not DHCP's.
    cfg.xid = xid;
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

/// A streaming host after DHCP: the image from the multicast stream, on a blocking thread
/// ([`crate::stream::receive`]); the receiver's counts land in the slot as it goes.
async fn stream_boot(ctx: &Ctx, b: &Binding, spec: &StreamBoot, slot: &Slot, t0: Instant) -> Result<(), String> {
    let url = format!("stream://{}", spec.group);
    {
        let mut r = lock(slot);
        r.phase = Phase::Files;
        r.current = Some(url.clone());
    }
    let (spec, local, deadline, cancel, live) =
        (spec.clone(), b.ip, ctx.deadline, ctx.cancel.clone(), slot.clone());
    let received = tokio::task::spawn_blocking(move || {
        crate::stream::receive(&spec, local, deadline, &cancel, &mut |st| {
            lock(&live).stream = Some(st.clone());
        })
        .map(|r| (r, spec.sha256))
    })
    .await
    .map_err(|e| format!("the stream receiver thread ended: {e}"))?;
    let (r, want) = received.map_err(|e| format!("{url}: {e}"))?;
    lock(slot).current = None;
    if r.sha256 != want {
        return Err(format!(
            "{url}: SHA-256 {} differs from the expected {} ({} bytes)",
            hex(&r.sha256),
            hex(&want),
            r.bytes
        ));
    }
    let file = FileReport {
        role: "stream".into(),
        url,
        transport: "stream",
        bytes: r.bytes,
        sha256: hex(&r.sha256),
        done_ms: ms(t0),
        verified: true,
        tftp_timeouts: 0,
    };
    let mut seen = Vec::new();
    record_file(ctx, slot, "stream", file, &r.sha256, &mut seen)?;
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

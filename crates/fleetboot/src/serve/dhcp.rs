//! The DHCP shell: sockets on 67 and 4011 around `fleetboot_dhcp::Engine`.
//!
//! Per datagram: the engine decides under a short lock (no I/O inside it); then a task
//! makes the lease changes durable and only then sends the replies, so an ACKed lease
//! survives a crash. The engine lock is never held across I/O.

use super::shared::{Service, Shared};
use crate::config::Config;
use anyhow::{Context, Result};
use fleetboot_dhcp::{Engine, EngineConfig, Incoming, Lease, LeaseChange, LeaseState};
use fleetboot_store::{LeaseRecord, Write};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

pub fn engine_config(c: &Config) -> Option<EngineConfig> {
    c.dhcp.engine_config(c.address)
}

pub fn to_record(l: &Lease) -> LeaseRecord {
    LeaseRecord {
        ip: l.ip,
        mac: l.mac.to_string(),
        client_id: l.client_id.clone(),
        expires_at: l.expires_at,
        hostname: l.hostname.clone(),
        state: match l.state {
            LeaseState::Bound => "bound".into(),
            LeaseState::Declined => "declined".into(),
        },
    }
}

pub fn from_record(r: &LeaseRecord) -> Option<Lease> {
    Some(Lease {
        ip: r.ip,
        mac: r.mac.parse().ok()?,
        client_id: r.client_id.clone(),
        expires_at: r.expires_at,
        hostname: r.hostname.clone(),
        state: match r.state.as_str() {
            "bound" => LeaseState::Bound,
            "declined" => LeaseState::Declined,
            _ => return None,
        },
    })
}

fn unix_now() -> u64 {
    super::shared::now_ms() / 1000
}

/// A UDP socket on `port` that may share the port with another DHCP server on the same
/// host (ProxyDHCP beside dnsmasq) and, when an interface is named, hears only it.
fn dhcp_socket(port: u16, interface: Option<&str>) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_broadcast(true)?;
    if let Some(iface) = interface {
        s.bind_device(Some(iface.as_bytes())).with_context(|| format!("binding to interface {iface}"))?;
    }
    super::grow_recv_buffer(&s, 8 << 20, "DHCP");
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).with_context(|| format!("binding UDP port {port}"))?;
    Ok(UdpSocket::from_std(s.into())?)
}

async fn recv_optional(sock: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// The engine as the negotiator's fallback on port 4011: ProxyDHCP REQUESTs and boot
/// server requests that are not for the negotiator's files. Port 4011 binds no leases, so
/// there is nothing to make durable before answering.
fn engine_on_4011(engine: Arc<Mutex<Engine>>, shared: Arc<Shared>) -> super::super::negotiate::boot::Fallback {
    Box::new(move |source, bytes| {
        let incoming = Incoming { bytes, source, local_port: fleetboot_dhcp::engine::PXE_PORT };
        let out = decide(&engine, &shared, incoming);
        if !out.lease_changes.is_empty() {
            tracing::error!(%source, "port 4011 asked for lease changes; reply withheld");
            return Vec::new();
        }
        out.transmits.into_iter().map(|t| (to_client_port(&shared, t.dest), t.bytes)).collect()
    })
}

/// The engine addresses clients on port 68; `dhcp.client_port` moves them (tests).
fn to_client_port(shared: &Shared, dest: SocketAddrV4) -> SocketAddrV4 {
    match dest.port() {
        fleetboot_dhcp::engine::CLIENT_PORT => SocketAddrV4::new(*dest.ip(), shared.config.dhcp.client_port),
        _ => dest,
    }
}

/// One datagram through the engine (under the lock, no I/O), counted and traced.
fn decide(engine: &Mutex<Engine>, shared: &Shared, incoming: Incoming<'_>) -> fleetboot_dhcp::Output {
    let out = {
        let mut e = engine.lock().unwrap_or_else(|p| p.into_inner());
        e.handle(unix_now(), incoming, shared)
    };
    metrics::counter!("fleetboot_dhcp_received_total").increment(1);
    if let Some(why) = &out.dropped {
        metrics::counter!("fleetboot_dhcp_dropped_total").increment(1);
        tracing::debug!(source = %incoming.source, len = incoming.bytes.len(), port = incoming.local_port, why, "DHCP packet dropped");
    }
    for ev in &out.events {
        shared.trace(ev.mac, ev.kind, ev.detail.clone());
    }
    out
}

pub async fn run(shared: Arc<Shared>) -> Result<()> {
    let config = &shared.config;
    let engine_config = engine_config(config).context("dhcp.mode is \"off\"")?;
    let mut engine = Engine::new(engine_config).map_err(|e| anyhow::anyhow!("dhcp.{e}"))?;
    let mut restored = 0;
    for r in shared.store.leases()? {
        match from_record(&r) {
            Some(l) => {
                shared.bind_ip(l.ip, l.mac);
                engine.load_lease(l);
                restored += 1;
            }
            None => tracing::warn!(ip = %r.ip, "unreadable lease row skipped"),
        }
    }
    if config.interface.is_none() {
        tracing::warn!("server.interface is not set: DHCP answers on every interface of this host");
    }
    let engine = Arc::new(Mutex::new(engine));
    let iface = config.interface.as_deref();
    let main = Arc::new(dhcp_socket(config.dhcp.port, iface)?);
    shared.listening_on(Service::Dhcp, main.local_addr()?);
    // With a [negotiate] section the negotiator owns port 4011 (its answers carry MTFTP
    // parameters) and hands the engine what is not boot server discovery for its files.
    let mut negotiator = None;
    let pxe = match config.negotiate {
        Some(_) => {
            let (engine, shared) = (engine.clone(), shared.clone());
            let config = shared.config.clone();
            let fallback = engine_on_4011(engine, shared);
            negotiator = Some(Box::pin(super::on_thread("fleetboot-negotiate", move || {
                super::super::negotiate::boot::run_with(config, Some(fallback))
            })));
            None
        }
        None => Some(Arc::new(dhcp_socket(config.dhcp.pxe_port, iface)?)),
    };
    if let Some(p) = &pxe {
        shared.listening_on(Service::Pxe, p.local_addr()?);
    }
    tracing::info!(restored, mode = ?config.dhcp.mode, port = config.dhcp.port, negotiator = pxe.is_none(), "DHCP listening");
    let mut buf_a = vec![0u8; 4096];
    let mut buf_b = vec![0u8; 4096];
    loop {
        let (n, src, sock, buf, local_port) = tokio::select! {
            r = main.recv_from(&mut buf_a) => { let (n, src) = r?; (n, src, &main, &buf_a, 67) }
            r = recv_optional(pxe.as_deref(), &mut buf_b) => {
                let (n, src) = r?;
                (n, src, pxe.as_ref().expect("received on it"), &buf_b, fleetboot_dhcp::engine::PXE_PORT)
            }
            r = async { negotiator.as_mut().expect("only polled when present").await }, if negotiator.is_some() => {
                r.context("the negotiator on port 4011")?;
                anyhow::bail!("the negotiator on port 4011 stopped");
            }
        };
        let SocketAddr::V4(source) = src else { continue };
        let out = decide(&engine, &shared, Incoming { bytes: &buf[..n], source, local_port });
        if out.transmits.is_empty() && out.lease_changes.is_empty() {
            continue;
        }
        let writes: Vec<Write> = out
            .lease_changes
            .iter()
            .map(|c| match c {
                LeaseChange::Bound(l) | LeaseChange::Declined(l) => Write::UpsertLease(to_record(l)),
                LeaseChange::Removed(ip) => Write::RemoveLease(*ip),
            })
            .collect();
        let (shared, sock, replies) = (shared.clone(), sock.clone(), shared.replies.clone());
        replies.spawn(async move {
            if !writes.is_empty() {
                if let Err(e) = shared.lease_store.commit(writes).await {
                    // No reply for a lease we could not make durable: the client retries.
                    tracing::error!(error = %e, "lease not stored; reply withheld");
                    return;
                }
            }
            for c in &out.lease_changes {
                match c {
                    LeaseChange::Bound(l) => shared.bind_ip(l.ip, l.mac),
                    LeaseChange::Removed(ip) | LeaseChange::Declined(Lease { ip, .. }) => shared.unbind_ip(*ip),
                }
            }
            for t in &out.transmits {
                metrics::counter!("fleetboot_dhcp_sent_total").increment(1);
                if let Err(e) = sock.send_to(&t.bytes, to_client_port(&shared, t.dest)).await {
                    tracing::warn!(dest = %t.dest, error = %e, "sending DHCP reply failed");
                }
            }
        });
    }
}

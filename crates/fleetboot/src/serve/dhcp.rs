//! The DHCP shell: port 67 around `fleetboot_dhcp::Engine`, and port 4011 (the boot
//! server, `crate::negotiate::boot`) beside it.
//!
//! Per datagram the engine decides under a short lock (no I/O inside it). A lease change
//! comes out as `Event::Persist`; a task makes it durable through [`Shared::lease_store`]
//! and then tells the engine (`committed`), which only then releases the ACK that depends
//! on it: the rule "an ACK never goes out for a lease that is not on disk" is the engine's,
//! this shell cannot send one early. On a shared store ([`super::cluster`]) the commit is
//! the database's decision among the servers: a bind it refuses (`LeaseConflict`) or
//! cannot make (store unreachable) is a failed commit, and its ACK never leaves. The
//! engine lock is never held across I/O. Both ports are bound to `server.interface` when
//! it is set (`SO_BINDTODEVICE`), through `fleetboot_net`.

use super::shared::{Service, Shared};
use crate::config::Config;
use anyhow::{Context, Result};
use fleetboot_dhcp::engine::{Event, LeaseChange, Ticket};
use fleetboot_dhcp::{Engine, EngineConfig, Lease, LeaseState};
use fleetboot_net::{Buffer, Outbox, UdpBuilder};
use fleetboot_store::{LeaseRecord, StoreError, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::UdpSocket;

static WITHHELD: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);

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

type Shell = Arc<Mutex<Engine<Arc<Shared>>>>;

fn lock(engine: &Shell) -> std::sync::MutexGuard<'_, Engine<Arc<Shared>>> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

fn writes_of(changes: &[LeaseChange]) -> Vec<Write> {
    changes
        .iter()
        .map(|c| match c {
            LeaseChange::Bound(l) | LeaseChange::Declined(l) => Write::UpsertLease(to_record(l)),
            LeaseChange::Removed(ip) => Write::RemoveLease(*ip),
        })
        .collect()
}

/// Takes what the engine reports (under its lock): traces and drops are recorded at once,
/// lease changes come back to be committed; its ready replies are gathered into `out`.
fn drain(engine: &mut Engine<Arc<Shared>>, shared: &Shared, out: &mut Outbox) -> Vec<(Ticket, Vec<LeaseChange>)> {
    let mut persist = Vec::new();
    while let Some(e) = engine.poll_event() {
        match e {
            Event::Persist { ticket, changes } => persist.push((ticket, changes)),
            Event::Trace(t) => shared.trace(t.mac, t.kind, t.detail),
            Event::Dropped { from, reason } => {
                metrics::counter!("fleetboot_dhcp_dropped_total").increment(1);
                tracing::debug!(%from, why = %reason, "DHCP packet dropped");
            }
        }
    }
    while let Some(t) = engine.poll_transmit(Instant::now(), out.buffer()) {
        out.push(t);
    }
    persist
}

async fn send(out: &mut Outbox, sock: &UdpSocket) {
    if out.is_empty() {
        return;
    }
    let n = out.len() as u64;
    match out.send_async(sock).await {
        Ok(r) => {
            metrics::counter!("fleetboot_dhcp_sent_total").increment(r.sent as u64);
            if let Some(e) = r.last_error {
                tracing::warn!(failed = r.failed, error = %e, "sending DHCP replies failed");
            }
        }
        Err(e) => tracing::warn!(replies = n, error = %e, "sending DHCP replies failed"),
    }
    out.clear();
}

/// Makes `changes` durable, then lets the engine release the replies that waited for them
/// and sends those. Runs on the server's reply tracker: a stopping server still sends
/// replies whose commit completes.
fn commit(shared: &Arc<Shared>, engine: &Shell, sock: &Arc<UdpSocket>, ticket: Ticket, changes: Vec<LeaseChange>) {
    let (shared, engine, sock) = (shared.clone(), engine.clone(), sock.clone());
    shared.clone().replies.spawn(async move {
        let stored = shared.lease_store.commit(writes_of(&changes)).await;
        let mut out = Outbox::new(16);
        let more = {
            let mut e = lock(&engine);
            match &stored {
                Ok(()) => e.committed(ticket),
                Err(err) => {
                    metrics::counter!("fleetboot_dhcp_withheld_total").increment(1);
                    if let StoreError::LeaseConflict { ip, .. } = err {
                        // Servers sharing a store: another one's client got the address
                        // first. The store said no, so no ACK; the client starts over.
                        tracing::debug!(%ip, "address bound through another server; reply withheld");
                    } else if let Some(skipped) = WITHHELD.ready() {
                        // A full or failing disk fails every commit: said once per interval.
                        tracing::error!(error = %err, skipped, "lease not stored; reply withheld (the lease on disk, if any, stands)");
                    }
                    e.commit_failed(ticket);
                }
            }
            drain(&mut e, &shared, &mut out)
        };
        if stored.is_ok() {
            for c in &changes {
                match c {
                    LeaseChange::Bound(l) => shared.bind_ip(l.ip, l.mac),
                    LeaseChange::Removed(ip) | LeaseChange::Declined(Lease { ip, .. }) => shared.unbind_ip(*ip),
                }
            }
        }
        send(&mut out, &sock).await;
        for (ticket, changes) in more {
            commit(&shared, &engine, &sock, ticket, changes);
        }
    });
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

pub async fn run(shared: Arc<Shared>) -> Result<()> {
    let config = &shared.config;
    let engine_config = engine_config(config).context("dhcp.mode is \"off\"")?;
    let mut engine = Engine::new(engine_config, shared.clone()).map_err(|e| anyhow::anyhow!("dhcp.{e}"))?;
    let mut restored = 0;
    // On a shared store the leases are read by `cluster::attach`, after it subscribed to
    // the other servers' changes.
    let rows = if shared.cluster.get().is_some() { Vec::new() } else { shared.store.leases()? };
    for r in rows {
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
    let engine: Shell = Arc::new(Mutex::new(engine));
    // Several servers on a shared store: who answers which client, and the others' leases.
    let cluster = super::cluster::attach(&shared, &engine).await.context("joining the DHCP servers of the shared store")?;
    // SO_REUSEPORT: another DHCP server on this host may own the port too (ProxyDHCP
    // beside dnsmasq). Boot storms arrive as bursts: a deep receive queue turns them into
    // latency instead of drops.
    let sock = Arc::new(
        UdpBuilder::new(SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.dhcp.port)))
            .reuse_address(true)
            .reuse_port(true)
            .broadcast(true)
            .device(config.interface.as_deref())
            .buffer(Buffer::Receive, 8 << 20)
            .purpose("DHCP")
            .bind_tokio()?,
    );
    shared.listening_on(Service::Dhcp, sock.local_addr()?);
    // Port 4011 beside it: the ProxyDHCP REQUEST, boot server discovery, and with a
    // [negotiate] section the multicast files.
    let boot_config = crate::negotiate::boot::boot_server_config(config, true);
    let (s4011, s_trace) = (shared.clone(), shared.clone());
    let boot_server = crate::negotiate::boot::serve(
        config,
        boot_config,
        shared.clone(),
        true,
        move |a| s4011.listening_on(Service::Pxe, a),
        move |t| s_trace.trace(t.mac, t.kind, t.detail),
    );
    tokio::pin!(boot_server);
    tracing::info!(restored, mode = ?config.dhcp.mode, port = config.dhcp.port, "DHCP listening");
    let mut buf = vec![0u8; 4096];
    let mut out = Outbox::new(64);
    loop {
        let next = lock(&engine).poll_timeout();
        let persist = tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, from) = r.context("DHCP port")?;
                metrics::counter!("fleetboot_dhcp_received_total").increment(1);
                if cluster.as_ref().is_some_and(|c| !c.leases().answers(&buf[..n])) {
                    Vec::new()
                } else {
                    let mut e = lock(&engine);
                    e.handle(Instant::now(), unix_now(), from, &buf[..n]);
                    drain(&mut e, &shared, &mut out)
                }
            }
            _ = sleep_until(next) => {
                let mut e = lock(&engine);
                e.handle_timeout(Instant::now());
                drain(&mut e, &shared, &mut out)
            }
            r = &mut boot_server => {
                r.context("the boot server on port 4011")?;
                anyhow::bail!("the boot server on port 4011 stopped");
            }
        };
        send(&mut out, &sock).await;
        for (ticket, changes) in persist {
            commit(&shared, &engine, &sock, ticket, changes);
        }
    }
}

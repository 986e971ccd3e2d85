//! Port 4011: the shell around `fleetboot_dhcp::BootServer`, for `fleetboot negotiate` and
//! inside `fleetboot serve`.
//!
//! The machine answers everything that arrives on 4011 (the ProxyDHCP REQUEST and boot
//! server discovery from the boot profiles; with a `[negotiate]` section, the multicast
//! files whose (group, port) its negotiator clears with the other negotiators and prepares
//! at a file server, wait packets meanwhile). This shell owns its sockets (all from
//! `fleetboot_net`), its clock and its records:
//!
//! - UDP 4011 (`negotiate.listen_port`, else `dhcp.pxe_port`), bound to `server.interface`
//!   like port 67: what clients reach.
//! - with `[negotiate]`: the peer port (`peer_port`, joined to `peer_group` on
//!   `server.address`) and a file-server socket on `server.address`. These two are not
//!   bound to the interface: they talk to negotiators and file servers that may run on this
//!   host, whose datagrams arrive on `lo`.
//! - with `server.bind_to_address`: 4011 and the peer port are bound to `server.address`
//!   (4011 then hears no broadcast), and a peer group gets a socket bound to the group,
//!   so several negotiators share one host, each on an address of its own.
//!
//! Records (`negotiate.records`, JSON lines): every assignment activated or released, every
//! client answered or told to wait, every conflict — what the namespace tests check.

use super::net::{unix_ms, Records};
use crate::config::Config;
use anyhow::{Context, Result};
use fleetboot_dhcp::boot_server::{BootEvent, BootServer, BootServerConfig, MulticastConfig};
use fleetboot_dhcp::{BootAdvisor, NoBootFiles, Trace};
use fleetboot_negotiate::Assignment;
use fleetboot_net::{Buffer, MulticastInterface, Outbox, UdpBuilder};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;
use tokio::net::UdpSocket;

/// Boot item types from here on select `boot_files[type - BOOT_TYPE_BASE]`.
pub use fleetboot_dhcp::boot_server::BOOT_TYPE_BASE;
pub use fleetboot_dhcp::pxe::SUB_WAIT_MS;

/// What the boot server of `config` is: inside `fleetboot serve` (`serving_dhcp`) a REQUEST
/// without a boot item is the ProxyDHCP REQUEST; for a negotiator on its own it asks for
/// the first multicast file.
pub fn boot_server_config(config: &Config, serving_dhcp: bool) -> BootServerConfig {
    BootServerConfig {
        server_ip: config.address,
        client_port: config.dhcp.client_port,
        proxy_requests: serving_dhcp,
        multicast: config.negotiate.as_ref().map(|n| MulticastConfig::from_section(n, config.address)),
    }
}

/// The port clients reach the boot server on.
pub fn listen_port(config: &Config) -> u16 {
    config.negotiate.as_ref().map_or(config.dhcp.pxe_port, |n| n.listen_port)
}

/// `fleetboot negotiate`: the boot server of a `[negotiate]` section on its own (no boot
/// profiles: it hands out the multicast files only), until the process ends.
pub fn run(config: Config) -> Result<()> {
    config.negotiate.as_ref().context("no [negotiate] section in the config")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cfg = boot_server_config(&config, false);
    rt.block_on(serve(&config, cfg, NoBootFiles, false, |_| {}, |t| tracing::debug!(mac = %t.mac, kind = t.kind, detail = %t.detail, "trace")))
}

async fn recv_on(sock: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Sends what was gathered; UDP is best effort and every sender here retries.
async fn send(out: &mut Outbox, sock: &UdpSocket, what: &str) {
    if out.is_empty() {
        return;
    }
    match out.send_async(sock).await {
        Ok(r) if r.failed > 0 => tracing::debug!(what, failed = r.failed, error = ?r.last_error, "some datagrams were refused"),
        Ok(_) => {}
        Err(e) => tracing::debug!(what, error = %e, "sending failed"),
    }
    out.clear();
}

/// Runs the boot server `cfg` of `config` until an I/O error. `shared_port`: port 4011 may
/// be shared with another server (SO_REUSEPORT, as port 67 is). `listening` is told where
/// 4011 is bound; `trace` gets each client's trace lines.
pub async fn serve<A: BootAdvisor>(
    config: &Config,
    mut cfg: BootServerConfig,
    advisor: A,
    shared_port: bool,
    listening: impl FnOnce(SocketAddr),
    trace: impl Fn(Trace),
) -> Result<()> {
    let me = config.address;
    let port = listen_port(config);
    // Every message to and from peers and file servers is signed and checked: without the
    // key a negotiator with peers does not start (see `key`).
    let mut refusals = None;
    if let Some(m) = cfg.multicast.as_mut() {
        m.negotiator.auth = Some(super::key::peer_auth(config, super::key::Side::Negotiator)?);
        m.negotiator.xid_seed = super::key::xid_seed();
        refusals = Some(super::key::RefusalReport::new("negotiator", &super::key::key_path(config, super::key::Side::Negotiator)));
    }
    if config.interface.is_none() {
        tracing::warn!(port, "server.interface is not set: the boot server answers on every interface of this host");
    }
    let local = if config.bind_to_address { me } else { Ipv4Addr::UNSPECIFIED };
    let clients = UdpBuilder::new(SocketAddr::from((local, port)))
        .reuse_address(shared_port)
        .reuse_port(shared_port)
        .broadcast(true)
        .device(config.interface.as_deref())
        .buffer(Buffer::Receive, 8 << 20)
        .purpose("PXE boot server")
        .bind_tokio()?;
    let (mut peer, mut peer_group, mut fs) = (None, None, None);
    if let Some(n) = &config.negotiate {
        let multicast = |b: UdpBuilder| b.multicast_interface(MulticastInterface::Address(me)).multicast_ttl(n.multicast_ttl).multicast_loop(true);
        let mut p = multicast(UdpBuilder::new(SocketAddr::from((local, n.peers.port)))).reuse_address(true).purpose("negotiator peers");
        match n.peers.group {
            // Bound to this host's own address, the peer socket hears no multicast: the
            // group gets a socket of its own, shared with the other parties of this host.
            Some(g) if config.bind_to_address => {
                let group = multicast(UdpBuilder::new(SocketAddr::from((g, n.peers.port))))
                    .reuse_address(true)
                    .join(IpAddr::V4(g), MulticastInterface::Address(me))
                    .purpose("negotiator peer group");
                peer_group = Some(group.bind_tokio()?);
            }
            Some(g) => p = p.join(IpAddr::V4(g), MulticastInterface::Address(me)),
            None => {}
        }
        peer = Some(p.bind_tokio()?);
        fs = Some(multicast(UdpBuilder::new(SocketAddr::from((me, 0)))).purpose("negotiator to file servers").bind_tokio()?);
    }
    listening(clients.local_addr()?);
    let rec = Records::open(config.negotiate.as_ref().and_then(|n| n.records.as_deref()))?;
    let mut boot = BootServer::new(cfg, advisor);
    if let Some(n) = &config.negotiate {
        rec.write(json!({"ts_ms": unix_ms(), "role": "negotiator", "server": me.to_string(), "event": "started",
            "port": port, "file_servers": n.file_servers.iter().map(|s| s.to_string()).collect::<Vec<_>>()}));
        tracing::info!("fleetboot negotiate on {me}:{port}: {} boot files, {} groups", n.boot_files.len(), n.groups.len());
    } else {
        tracing::info!(port, "PXE boot server listening");
    }
    let (mut to_clients, mut to_peers, mut to_fs) = (Outbox::new(64), Outbox::new(64), Outbox::new(64));
    let (mut b1, mut b2, mut b3, mut b4) = (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
    let mut staging = Vec::new();
    // The slots it hands out, for the dashboard (`crate::status`): checked once a second.
    let mut live = config.negotiate.as_ref().map(|_| (LiveSlots::default(), crate::status::Writer::new(&config.data_dir, "negotiator", me.to_string())));
    let mut status_tick = tokio::time::interval(crate::status::WRITE_EVERY);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = status_tick.tick(), if live.is_some() => {
                if let Some((slots, writer)) = live.as_mut() {
                    writer.publish(Instant::now(), Vec::new(), slots.report());
                }
                continue;
            }
            r = clients.recv_from(&mut b1) => {
                let (n, from) = r.context("port 4011")?;
                metrics::counter!("fleetboot_dhcp_received_total").increment(1);
                boot.handle(Instant::now(), from, &b1[..n]);
            }
            r = recv_on(peer.as_ref(), &mut b2) => {
                let (n, from) = r.context("the negotiator's peer port")?;
                boot.handle_peer(Instant::now(), from, &b2[..n]);
                if let Some(r) = refusals.as_mut() {
                    r.update(boot.negotiator().and_then(|n| n.refusals()), &rec, me);
                }
            }
            r = recv_on(peer_group.as_ref(), &mut b4) => {
                let (n, from) = r.context("the negotiator's peer group")?;
                boot.handle_peer(Instant::now(), from, &b4[..n]);
            }
            r = recv_on(fs.as_ref(), &mut b3) => {
                let (n, from) = r.context("the negotiator's file-server socket")?;
                boot.handle_file_server(Instant::now(), from, &b3[..n]);
                if let Some(r) = refusals.as_mut() {
                    r.update(boot.negotiator().and_then(|n| n.refusals()), &rec, me);
                }
            }
            _ = sleep_until(boot.poll_timeout()) => boot.handle_timeout(Instant::now()),
        }
        let now = Instant::now();
        while let Some(t) = boot.poll_transmit(now, to_clients.buffer()) {
            metrics::counter!("fleetboot_dhcp_sent_total").increment(1);
            to_clients.push(t);
        }
        // To a file server from the file-server socket, whose replies come back to it; the
        // rest (queries, answers to queries, announcements) from the peer port.
        while let Some(t) = boot.poll_negotiation(now, &mut staging) {
            let out = if boot.is_file_server(t.destination) { &mut to_fs } else { &mut to_peers };
            out.buffer().extend_from_slice(&staging);
            out.push(t);
            staging.clear();
        }
        send(&mut to_clients, &clients, "answers to PXE clients").await;
        if let Some(p) = &peer {
            send(&mut to_peers, p, "conflict queries").await;
        }
        if let Some(f) = &fs {
            send(&mut to_fs, f, "file server requests").await;
        }
        while let Some(e) = boot.poll_event() {
            if let Some((slots, _)) = live.as_mut() {
                slots.observe(&e);
            }
            record(&rec, me, e, &trace);
        }
    }
}

/// The assignments this negotiator hands out, with the clients it sent to each and since
/// when: what its status report carries. One entry per active assignment (the negotiator
/// bounds those by its groups and boot files); distinct clients are remembered up to
/// [`MAX_CLIENTS_REMEMBERED`] per slot, answers beyond counted as new clients.
#[derive(Default)]
struct LiveSlots(std::collections::BTreeMap<(String, String), (crate::status::SlotLive, std::collections::HashSet<fleetboot_boot::MacAddr>)>);

const MAX_CLIENTS_REMEMBERED: usize = 4096;

impl LiveSlots {
    fn key(a: &Assignment) -> (String, String) {
        (a.file.clone(), format!("{}:{}", a.slot.group, a.slot.port))
    }

    fn entry(&mut self, a: &Assignment) -> &mut (crate::status::SlotLive, std::collections::HashSet<fleetboot_boot::MacAddr>) {
        self.0.entry(Self::key(a)).or_insert_with(|| {
            let live = crate::status::SlotLive {
                group: format!("{}:{}", a.slot.group, a.slot.port),
                file: a.file.clone(),
                clients: 0,
                since_ms: unix_ms(),
                with: format!("file server {}:{}", a.file_server, a.server_port),
            };
            (live, std::collections::HashSet::new())
        })
    }

    fn observe(&mut self, e: &BootEvent) {
        match e {
            BootEvent::Activated(a) => {
                self.entry(a);
            }
            BootEvent::Answered { client, assignment, .. } => {
                let (live, seen) = self.entry(assignment);
                if seen.len() >= MAX_CLIENTS_REMEMBERED || seen.insert(*client) {
                    live.clients += 1;
                }
            }
            BootEvent::Released { assignment, .. } => {
                self.0.remove(&Self::key(assignment));
            }
            _ => {}
        }
    }

    fn report(&self) -> Vec<crate::status::SlotLive> {
        self.0.values().map(|(live, _)| live.clone()).collect()
    }
}

fn slot_json(a: &Assignment) -> serde_json::Value {
    json!({"file": a.file, "group": a.slot.group.to_string(), "port": a.slot.port,
        "file_server": a.file_server.to_string(), "server_port": a.server_port})
}

/// Writes what the boot server reports: trace lines to `trace`, drops to the metrics and
/// the debug log, the multicast events to the records.
fn record(rec: &Records, me: Ipv4Addr, e: BootEvent, trace: &impl Fn(Trace)) {
    let ts = unix_ms();
    let server = me.to_string();
    let with_slot = |a: &Assignment, event: &str| {
        let mut v = slot_json(a);
        v["ts_ms"] = ts.into();
        v["role"] = "negotiator".into();
        v["server"] = server.clone().into();
        v["event"] = event.into();
        v
    };
    match e {
        BootEvent::Trace(t) => trace(t),
        BootEvent::Dropped { from, reason } => {
            metrics::counter!("fleetboot_dhcp_dropped_total").increment(1);
            tracing::debug!(%from, port = 4011, why = %reason, "DHCP packet dropped");
        }
        BootEvent::Answered { client, assignment, cleared, waited } => {
            let mut v = with_slot(&assignment, "answered");
            v["client"] = client.to_string().into();
            v["cleared"] = cleared.into();
            v["waited_ms"] = (waited.as_millis() as u64).into();
            rec.write(v);
        }
        BootEvent::Wait { client, file, wait } => rec.write(json!({"ts_ms": ts, "role": "negotiator", "server": server, "event": "wait",
            "client": client.to_string(), "file": file, "wait_ms": wait.as_millis() as u64})),
        BootEvent::Failed { client, file, reason } => rec.write(json!({"ts_ms": ts, "role": "negotiator", "server": server, "event": "failed",
            "client": client.to_string(), "file": file, "reason": reason})),
        BootEvent::Conflict { slot, file, by } => rec.write(json!({"ts_ms": ts, "role": "negotiator", "server": server, "event": "conflict",
            "group": slot.group.to_string(), "port": slot.port, "file": file, "by": by.to_string()})),
        BootEvent::Activated(a) => rec.write(with_slot(&a, "activated")),
        BootEvent::Released { assignment, reason } => {
            let mut v = with_slot(&assignment, "released");
            v["reason"] = reason.into();
            rec.write(v);
        }
    }
}

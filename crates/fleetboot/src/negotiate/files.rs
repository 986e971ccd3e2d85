//! `fleetboot files`: the multicast TFTP file server.
//!
//! One thread, one `poll(2)` loop over:
//! - the control port: the negotiator <-> file server protocol, driving [`FileRegistry`]
//!   (PREPARE -> ACK/NAK, DELETE, expiry). A slot configured there gets an [`MtftpServer`]
//!   and its own transfer socket (DATA to the group, ACKs from the master).
//! - the negotiators' peer port (joined to `peer_group` if set): conflict queries for the
//!   slots this server carries are answered ([`FileRegistry::handle_query`]), and for the
//!   (group, port)s its RFC 2090 transfers use.
//! - the MTFTP server port: PXE MTFTP RRQs, routed by file name to the slot carrying it.
//! - the RFC 2090 port: RRQs with the `multicast` option; each file gets a group of its own
//!   from `rfc2090_groups` and an [`Rfc2090Server`].
//!
//! Files are read a block at a time through a [`ReadAhead`] per transfer (a slot or an RFC
//! 2090 file), never held whole: at most `files.max_groups` slots and one RFC 2090 transfer
//! per group of `rfc2090_groups`, each with its socket and its open file.
//!
//! The ports clients reach (MTFTP, RFC 2090, the transfer sockets) are bound to
//! `server.interface` when one is set, like the TFTP service's. The control and peer ports
//! are not: they talk to negotiators, which may run on this host, and a datagram a host
//! sends itself arrives on `lo`, where a socket bound to another interface never sees it.
//!
//! With `server.bind_to_address` every port is bound to `server.address` rather than
//! 0.0.0.0, and a peer group is heard on a socket bound to the group (shared, with
//! `SO_REUSEADDR`, with the other parties on this host): several file servers and
//! negotiators then share one host, each on an address of its own.

use super::net::{self, Records};
use crate::config::{Config, FilesConfig};
use anyhow::{Context, Result};
use fleetboot_negotiate::{ConflictOp, ConflictPacket, FileRegistry, RegistryEvent, Slot};
use fleetboot_net::{Poller, Transmit};
use fleetboot_tftp::codec::{self, ErrorCode, Packet};
use fleetboot_tftp::mtftp::{MtftpEvent, MtftpServer, SenderConfig};
use fleetboot_tftp::rfc2090::Rfc2090Server;
use fleetboot_tftp::source::ReadAhead;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest read of a transfer's file: a multicast flow reads in order, a repair list steps
/// back, usually within this.
const READ_AHEAD: usize = 256 << 10;

/// A file being multicast: read as the blocks are asked for.
type FileSource = ReadAhead<std::fs::File>;

/// RFC 2090 transfers use this block size (what the OACK confirms when asked).
const RFC2090_BLKSIZE: u16 = 512;

struct Pxe {
    server: MtftpServer,
    sock: UdpSocket,
    data: FileSource,
    dest: SocketAddrV4,
    /// Transfers opened on this slot, and since when it is configured (for the dashboard).
    opened: u64,
    since_ms: u64,
}

struct Rfc {
    server: Rfc2090Server,
    group: SocketAddrV4,
    sock: UdpSocket,
    data: FileSource,
    since_ms: u64,
}

struct Files {
    addr: Ipv4Addr,
    /// `server.interface`: the client-facing sockets are bound to it.
    device: Option<String>,
    root: PathBuf,
    cfg: FilesConfig,
    reg: FileRegistry,
    pxe: BTreeMap<Slot, Pxe>,
    rfc: BTreeMap<String, Rfc>,
    rec: Records,
}

fn has_file(root: &Path, name: &str) -> bool {
    fleetboot_tftp::resolve(root, name).is_ok_and(|p| p.is_file())
}

static SLOTS_FULL: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);
static OPEN_FAILED: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::LOG_EVERY);

impl Files {
    /// Opens a file under the root for one transfer: its reader and its length.
    fn open(&self, name: &str) -> Option<(FileSource, u64)> {
        let p = fleetboot_tftp::resolve(&self.root, name).ok()?;
        let file = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) => {
                if crate::limits::is_out_of_fds(&e) {
                    metrics::counter!("fleetboot_files_open_failures_total", "reason" => "no_file_descriptors").increment(1);
                }
                if let Some(skipped) = OPEN_FAILED.ready() {
                    tracing::warn!(file = name, error = %e, skipped, "multicast file server: cannot open a file to serve");
                }
                return None;
            }
        };
        let meta = file.metadata().ok().filter(|m| m.is_file())?;
        Some((ReadAhead::new(file, READ_AHEAD), meta.len()))
    }

    fn transfer_socket(&self) -> Result<UdpSocket> {
        net::udp_on(
            SocketAddrV4::new(self.addr, 0),
            self.addr,
            self.cfg.multicast_ttl,
            false,
            self.device.as_deref(),
        )
    }

    /// Records what a PXE MTFTP server reports; its other events need no action.
    fn pxe_events(&mut self, slot: Slot) {
        let Some(p) = self.pxe.get_mut(&slot) else { return };
        let mut opened = Vec::new();
        while let Some(e) = p.server.poll_event() {
            match e {
                MtftpEvent::Opened { master } => opened.push(master),
                MtftpEvent::SourceFailed(kind) => tracing::warn!(file = %p.server.file, ?kind, "MTFTP source failed"),
                MtftpEvent::MasterDone(_) | MtftpEvent::MasterLost(_) => {}
            }
        }
        p.opened += opened.len() as u64;
        let (file, dest) = (p.server.file.clone(), p.dest);
        for master in opened {
            self.rec.write(json!({"ts_ms": net::unix_ms(), "role": "files", "server": self.addr.to_string(),
                "event": "opened", "scheme": "pxe-mtftp", "group": dest.ip().to_string(), "port": dest.port(),
                "file": file, "master": master.to_string()}));
        }
    }

    fn registry_events(&mut self) {
        while let Some(e) = self.reg.poll_event() {
            match e {
                RegistryEvent::Configured {
                    slot,
                    file,
                    server_port,
                } => {
                    let Some((data, len)) = self.open(&file) else {
                        continue;
                    };
                    let dest = SocketAddrV4::new(slot.group, slot.port);
                    let Some(server) =
                        MtftpServer::new(&file, len, dest, SenderConfig::default())
                    else {
                        tracing::warn!("{file}: too large for MTFTP");
                        continue;
                    };
                    let sock = match self.transfer_socket() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("transfer socket: {e:#}");
                            continue;
                        }
                    };
                    self.rec.write(json!({"ts_ms": net::unix_ms(), "role": "files", "server": self.addr.to_string(),
                        "event": "configured", "scheme": "pxe-mtftp", "group": slot.group.to_string(), "port": slot.port,
                        "server_port": server_port, "file": file, "bytes": len}));
                    self.pxe.insert(
                        slot,
                        Pxe {
                            server,
                            sock,
                            data,
                            dest,
                            opened: 0,
                            since_ms: net::unix_ms(),
                        },
                    );
                }
                RegistryEvent::Released { slot, file } => {
                    self.rec.write(json!({"ts_ms": net::unix_ms(), "role": "files", "server": self.addr.to_string(),
                        "event": "released", "scheme": "pxe-mtftp", "group": slot.group.to_string(), "port": slot.port, "file": file}));
                    self.pxe.remove(&slot);
                }
            }
        }
    }

    fn mtftp_rrq(&mut self, sock: &UdpSocket, now: Instant, from: SocketAddrV4, bytes: &[u8]) {
        let Ok(Packet::Rrq { filename, .. }) = Packet::parse(bytes) else {
            return;
        };
        let slot = self.reg.slot_for(&filename, self.cfg.mtftp_port);
        match slot.filter(|s| self.pxe.contains_key(s)) {
            Some(slot) => {
                let p = self.pxe.get_mut(&slot).expect("checked");
                let from = SocketAddr::V4(from);
                p.server.handle(now, from, bytes);
                // An answer to this RRQ leaves from the port it came to; DATA from the
                // transfer's own.
                flush(&p.sock, Some((sock, from)), |b| p.server.poll_transmit(now, &mut p.data, b));
                self.pxe_events(slot);
            }
            None => {
                let mut e = Vec::new();
                codec::encode_error(
                    ErrorCode::FileNotFound,
                    "no group prepared for this file",
                    &mut e,
                );
                net::send(sock, from, &e);
            }
        }
    }

    fn rfc2090_rrq(&mut self, sock: &UdpSocket, now: Instant, from: SocketAddrV4, bytes: &[u8]) {
        let Ok(Packet::Rrq {
            filename, options, ..
        }) = Packet::parse(bytes)
        else {
            return;
        };
        let error = |msg: &str, code| {
            let mut e = Vec::new();
            codec::encode_error(code, msg, &mut e);
            net::send(sock, from, &e);
        };
        if !options
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("multicast"))
        {
            return error(
                "this port serves RFC 2090 multicast only",
                ErrorCode::IllegalOperation,
            );
        }
        if !self.rfc.contains_key(&filename) {
            let Some((data, len)) = self.open(&filename) else {
                return error("file not found", ErrorCode::FileNotFound);
            };
            let used: Vec<Ipv4Addr> = self.rfc.values().map(|r| *r.group.ip()).collect();
            let Some(group) = self
                .cfg
                .rfc2090_groups
                .iter()
                .find(|g| !used.contains(g))
                .copied()
            else {
                return error("no multicast group free", ErrorCode::DiskFull);
            };
            let dest = SocketAddrV4::new(group, self.cfg.rfc2090_client_port);
            // RFC 2090 transfers use this block size (what the OACK confirms when asked).
            let cfg = SenderConfig {
                blksize: RFC2090_BLKSIZE,
                ..SenderConfig::default()
            };
            let Some(server) = Rfc2090Server::new(&filename, len, dest, cfg) else {
                return error("file too large for multicast TFTP", ErrorCode::DiskFull);
            };
            let sock = match self.transfer_socket() {
                Ok(s) => s,
                Err(e) => return tracing::warn!("transfer socket: {e:#}"),
            };
            self.rec.write(json!({"ts_ms": net::unix_ms(), "role": "files", "server": self.addr.to_string(),
                "event": "configured", "scheme": "rfc2090", "group": group.to_string(), "port": dest.port(),
                "file": filename, "bytes": len}));
            self.rfc.insert(
                filename.clone(),
                Rfc {
                    server,
                    group: dest,
                    sock,
                    data,
                    since_ms: net::unix_ms(),
                },
            );
        }
        let r = self.rfc.get_mut(&filename).expect("inserted");
        let was_master = r.server.sender().master();
        r.server.handle(now, SocketAddr::V4(from), bytes);
        let master = r.server.sender().master() == Some(from);
        flush(&r.sock, None, |b| r.server.poll_transmit(now, &mut r.data, b));
        self.rec.write(
            json!({"ts_ms": net::unix_ms(), "role": "files", "server": self.addr.to_string(),
            "event": "rfc2090_join", "file": filename, "client": from.to_string(), "master": master,
            "flowing": was_master.is_some()}),
        );
    }

    /// The groups in use, for the dashboard (`crate::status`): the negotiators' slots with
    /// the transfers opened on each, then the RFC 2090 transfers with their clients.
    fn live_slots(&self) -> Vec<crate::status::SlotLive> {
        let groups = self.reg.groups();
        let pxe = self.pxe.iter().map(|(slot, p)| crate::status::SlotLive {
            group: p.dest.to_string(),
            file: p.server.file.clone(),
            clients: p.opened,
            since_ms: p.since_ms,
            with: groups
                .get(slot)
                .map(|g| g.negotiators.keys().map(|n| format!("negotiator {n}")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
        });
        let rfc = self.rfc.iter().map(|(file, r)| crate::status::SlotLive {
            group: r.group.to_string(),
            file: file.clone(),
            clients: r.server.clients().len() as u64,
            since_ms: r.since_ms,
            with: "RFC 2090 clients".into(),
        });
        pxe.chain(rfc).take(crate::status::MAX_ITEMS).collect()
    }

    fn deadline(&self) -> Option<Instant> {
        let p = self.pxe.values().filter_map(|p| p.server.poll_timeout());
        let r = self.rfc.values().filter_map(|r| r.server.poll_timeout());
        p.chain(r).chain(self.reg.poll_timeout()).min()
    }

    /// Timeouts and DATA due, for every group.
    fn tick(&mut self, now: Instant) {
        let slots: Vec<Slot> = self.pxe.keys().copied().collect();
        for slot in slots {
            let p = self.pxe.get_mut(&slot).expect("listed");
            if p.server.poll_timeout().is_some_and(|t| t <= now) {
                p.server.handle_timeout(now);
            }
            flush(&p.sock, None, |b| p.server.poll_transmit(now, &mut p.data, b));
            self.pxe_events(slot);
        }
        let mut done = Vec::new();
        for (name, r) in self.rfc.iter_mut() {
            if r.server.poll_timeout().is_some_and(|t| t <= now) {
                r.server.handle_timeout(now);
            }
            flush(&r.sock, None, |b| r.server.poll_transmit(now, &mut r.data, b));
            if r.server.clients().is_empty() && r.server.sender().is_idle() {
                done.push(name.clone());
            }
        }
        for name in done {
            self.rfc.remove(&name);
        }
        if self.reg.poll_timeout().is_some_and(|t| t <= now) {
            self.reg.expire(now);
        }
        self.registry_events();
    }
}

/// Sends every datagram a machine has queued, each from `sock`, except answers to
/// `reply.1`, which leave from `reply.0` (the port its request came to). UDP is best
/// effort: a refused datagram is logged and the machine's timers repeat what matters.
fn flush(sock: &UdpSocket, reply: Option<(&UdpSocket, SocketAddr)>, mut poll: impl FnMut(&mut Vec<u8>) -> Option<Transmit>) {
    let mut buf = Vec::with_capacity(2048);
    loop {
        buf.clear();
        let Some(t) = poll(&mut buf) else { return };
        let via = match reply {
            Some((s, to)) if to == t.destination => s,
            _ => sock,
        };
        if let Err(e) = fleetboot_net::send_from(via, &buf, Some(t.destination), t.source) {
            tracing::debug!("send to {}: {e}", t.destination);
        }
    }
}

/// Whether a conflict query is for a (group, port) an RFC 2090 transfer uses here: those
/// groups are not the negotiators' to hand out, so the query is answered.
fn rfc2090_conflict(rfc: &BTreeMap<String, Rfc>, q: &ConflictPacket) -> bool {
    q.op == ConflictOp::Query && rfc.values().any(|r| r.group == SocketAddrV4::new(q.group, q.port))
}

pub fn run(config: Config) -> Result<()> {
    let cfg = config
        .files
        .clone()
        .context("no [files] section in the config")?;
    let addr = config.address;
    let ttl = cfg.multicast_ttl;
    let own = config.bind_to_address;
    let local = if own { addr } else { Ipv4Addr::UNSPECIFIED };
    let any = |port| SocketAddrV4::new(local, port);
    let device = config.interface.clone();
    let control = net::udp(any(cfg.control_port), addr, ttl, false)?;
    let peer = net::udp(any(cfg.peer_port), addr, ttl, true)?;
    // Bound to this host's own address, the peer socket hears no multicast: the group gets
    // a socket of its own, shared with the other parties of this host.
    let peer_group = match (cfg.peer_group, own) {
        (Some(g), false) => {
            net::join(&peer, g, addr)?;
            None
        }
        (Some(g), true) => {
            let s = net::udp(SocketAddrV4::new(g, cfg.peer_port), addr, ttl, true)?;
            net::join(&s, g, addr)?;
            Some(s)
        }
        (None, _) => None,
    };
    let mtftp = net::udp_on(any(cfg.mtftp_port), addr, ttl, false, device.as_deref())?;
    let rfc = net::udp_on(any(cfg.rfc2090_port), addr, ttl, false, device.as_deref())?;
    let auth = super::key::peer_auth(&config, super::key::Side::FileServer)?;
    let mut refusals = super::key::RefusalReport::new("files", &super::key::key_path(&config, super::key::Side::FileServer));
    let mut f = Files {
        addr,
        device,
        root: config.root.clone(),
        reg: {
            let root = config.root.clone();
            FileRegistry::new(addr, cfg.registration_ttl, move |name: &str| has_file(&root, name)).with_max_groups(cfg.max_groups).with_auth(auth)
        },
        cfg,
        pxe: BTreeMap::new(),
        rfc: BTreeMap::new(),
        rec: Records::open(config.files.as_ref().and_then(|f| f.records.as_deref()))?,
    };
    f.rec.write(json!({"ts_ms": net::unix_ms(), "role": "files", "server": addr.to_string(), "event": "started",
        "control_port": f.cfg.control_port, "mtftp_port": f.cfg.mtftp_port, "rfc2090_port": f.cfg.rfc2090_port}));
    tracing::info!(
        "fleetboot files on {addr}: control {}, MTFTP {}, RFC 2090 {}, root {}",
        f.cfg.control_port,
        f.cfg.mtftp_port,
        f.cfg.rfc2090_port,
        f.root.display()
    );
    let mut status = crate::status::Writer::new(&config.data_dir, "file server", addr.to_string());
    let mut next_status = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut poller = Poller::new();
    loop {
        // Looked at once a second, written only when it changed.
        if Instant::now() >= next_status {
            status.publish(Instant::now(), Vec::new(), f.live_slots());
            next_status = Instant::now() + crate::status::WRITE_EVERY;
        }
        let deadline = f.deadline();
        // Transfer sockets (ACKs) follow the four fixed ones, PXE groups then RFC 2090 files.
        let pxe_keys: Vec<Slot> = f.pxe.keys().copied().collect();
        let rfc_keys: Vec<String> = f.rfc.keys().cloned().collect();
        poller.clear();
        for s in [&control, &peer, &mtftp, &rfc]
            .into_iter()
            .chain(f.pxe.values().map(|p| &p.sock))
            .chain(f.rfc.values().map(|r| &r.sock))
            .chain(peer_group.as_ref())
        {
            poller.add(s);
        }
        let group_at = 4 + pxe_keys.len() + rfc_keys.len();
        let ready = net::wait_on(&mut poller, deadline, Duration::from_millis(200));
        let now = Instant::now();
        // The registry's replies answer the datagram just handled: they leave from the
        // socket it came to.
        if ready[0] {
            let refused_before = f.reg.refused_full();
            let unicast_before = f.reg.refused_unicast();
            net::drain(&control, &mut buf, |from, bytes| f.reg.handle(now, SocketAddr::V4(from), bytes));
            flush(&control, None, |b| f.reg.poll_transmit(now, b));
            refusals.update(f.reg.refusals(), &f.rec, addr);
            let unicast = f.reg.refused_unicast() - unicast_before;
            if unicast > 0 {
                metrics::counter!("fleetboot_files_unicast_groups_refused_total").increment(unicast);
                tracing::warn!(count = unicast, "multicast file server: refused a PREPARE whose group is not a multicast address");
            }
            let refused = f.reg.refused_full() - refused_before;
            if refused > 0 {
                metrics::counter!("fleetboot_files_slots_refused_total").increment(refused);
                if let Some(skipped) = SLOTS_FULL.ready() {
                    tracing::warn!(max_groups = f.cfg.max_groups, skipped, "multicast file server: every slot is in use; PREPAREs answered busy");
                }
            }
            f.registry_events();
        }
        // Conflict queries and answers: on the peer port, and on the peer group's own socket
        // when there is one; answered from the peer port either way.
        let from_peers = [(ready[1], &peer), (peer_group.is_some() && ready[group_at], peer_group.as_ref().unwrap_or(&peer))];
        for (_, sock) in from_peers.into_iter().filter(|(r, _)| *r) {
            net::drain(sock, &mut buf, |from, bytes| {
                if *from.ip() == addr {
                    return;
                }
                // Only an authenticated query is answered, for the negotiators' slots and
                // for the groups this server's RFC 2090 transfers use.
                if let Some(q) = f.reg.handle_peer(now, SocketAddr::V4(from), bytes) {
                    if rfc2090_conflict(&f.rfc, &q) {
                        f.reg.answer(SocketAddr::V4(from), &q);
                    }
                }
                flush(&peer, None, |b| f.reg.poll_transmit(now, b));
            });
            refusals.update(f.reg.refusals(), &f.rec, addr);
            f.registry_events();
        }
        if ready[2] {
            let mut got = Vec::new();
            net::drain(&mtftp, &mut buf, |from, bytes| {
                got.push((from, bytes.to_vec()))
            });
            for (from, b) in got {
                f.mtftp_rrq(&mtftp, now, from, &b);
            }
        }
        if ready[3] {
            let mut got = Vec::new();
            net::drain(&rfc, &mut buf, |from, bytes| {
                got.push((from, bytes.to_vec()))
            });
            for (from, b) in got {
                f.rfc2090_rrq(&rfc, now, from, &b);
            }
        }
        for (i, key) in pxe_keys.iter().enumerate() {
            let Some(p) = f.pxe.get_mut(key).filter(|_| ready[4 + i]) else {
                continue;
            };
            net::drain(&p.sock, &mut buf, |from, bytes| {
                p.server.handle(now, SocketAddr::V4(from), bytes)
            });
            flush(&p.sock, None, |b| p.server.poll_transmit(now, &mut p.data, b));
            f.pxe_events(*key);
        }
        for (i, key) in rfc_keys.iter().enumerate() {
            let Some(r) = f.rfc.get_mut(key).filter(|_| ready[4 + pxe_keys.len() + i]) else {
                continue;
            };
            net::drain(&r.sock, &mut buf, |from, bytes| {
                r.server.handle(now, SocketAddr::V4(from), bytes)
            });
            flush(&r.sock, None, |b| r.server.poll_transmit(now, &mut r.data, b));
        }
        f.tick(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2090_groups_are_defended_against_conflict_queries() {
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 209, 1), 1760);
        let sock = net::udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), Ipv4Addr::LOCALHOST, 1, false).unwrap();
        let server = Rfc2090Server::new("f", 10, group, SenderConfig::default()).unwrap();
        let path = std::env::temp_dir().join(format!("fleetboot-files-test-{}", std::process::id()));
        std::fs::write(&path, [0u8; 10]).unwrap();
        let data = ReadAhead::new(std::fs::File::open(&path).unwrap(), READ_AHEAD);
        let _ = std::fs::remove_file(&path);
        let rfc = BTreeMap::from([(
            "f".to_string(),
            Rfc {
                server,
                group,
                sock,
                data,
                since_ms: 0,
            },
        )]);
        let q = |port| ConflictPacket {
            op: ConflictOp::Query,
            file_server: Ipv4Addr::new(10, 0, 0, 9),
            negotiator_type: 0x8000,
            layer: 0,
            group: *group.ip(),
            port,
            boot_file: "other".into(),
        };
        assert!(rfc2090_conflict(&rfc, &q(1760)));
        assert!(!rfc2090_conflict(&rfc, &q(1758)));
        assert!(!rfc2090_conflict(&rfc, &q(1760).with_op(ConflictOp::Response)));
    }
}

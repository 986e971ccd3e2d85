//! Port 4011 as one machine: the PXE boot server.
//!
//! What a PXE client asks on 4011 (a DHCPREQUEST, or INFORM, with option 60 `PXEClient`):
//!
//! - **the ProxyDHCP REQUEST** (PXE 2.1 §2.2.5; no boot item): a ROM that got a ProxyDHCP
//!   offer asks the ProxyDHCP server for its boot file. Answered from the [`BootAdvisor`],
//!   like the offer on port 67.
//! - **boot server discovery** for boot item type `T` (option 43 sub-option 71): when
//!   [`MulticastConfig`] lists a file for `T` (`T = 0x8000 + i` asks for `boot_files[i]`),
//!   the file is multicast: the [`Negotiator`] clears a (group, port) with its peers and
//!   prepares it at a file server, the client gets a *wait packet* meanwhile (a DHCPACK
//!   without a file whose option 43 carries [`SUB_WAIT_MS`]; another after each conflict),
//!   and then the DHCPACK with the file, the file server as `siaddr` and option 43
//!   sub-options 1-5 (MTFTP group, ports, timeouts). Any other `T` is answered from the
//!   advisor with the item echoed.
//!
//! Without [`BootServerConfig::proxy_requests`] (a negotiator on its own, with no boot
//! profiles) a REQUEST without a boot item asks for the first multicast file.
//!
//! # The contract, on three sockets
//!
//! [`BootServer::handle`] takes what arrives on 4011; [`BootServer::handle_peer`] and
//! [`BootServer::handle_file_server`] what arrives on the negotiator's peer port and on its
//! file-server socket. [`BootServer::poll_transmit`] hands out the answers to clients (they
//! leave from 4011); [`BootServer::poll_negotiation`] the negotiator's datagrams (to a file
//! server, [`BootServer::is_file_server`], from the file-server socket; the others from the
//! peer port). Events ([`BootEvent`]) are the boot traces and the records of each
//! assignment and answer.

use crate::codec::{opt, DhcpMessage, MessageType, BOOTREQUEST};
use crate::engine::PXE_PORT;
use crate::identify::identify;
use crate::pxe::{discovery, BootItem, PxeOptions, SUB_WAIT_MS};
use crate::reply::{add_boot_info, describe_request, nonzero, reply_to, BootAdvisor, BootOffer, Trace, BOOT_SERVER_TYPE};
use fleetboot_boot::MacAddr;
use fleetboot_negotiate::config::NegotiateConfig;
use fleetboot_negotiate::{Assignment, Event as NegotiatorEvent, Negotiator, NegotiatorConfig, Slot};
use fleetboot_proto::Transmit;
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Boot item types from here on select `boot_files[type - BOOT_TYPE_BASE]`.
pub const BOOT_TYPE_BASE: u16 = BOOT_SERVER_TYPE;

/// Clients waiting for a multicast answer, at most; past it new ones are dropped (and
/// counted) until some are answered or forgotten.
pub const MAX_PENDING: usize = 4096;

/// Answers and events waiting, at most each (a shell drains after every call).
const MAX_QUEUED: usize = 8192;

/// The multicast files of a negotiator.
#[derive(Debug, Clone)]
pub struct MulticastConfig {
    /// Boot item type `0x8000 + i` asks for `boot_files[i]`.
    pub boot_files: Vec<String>,
    /// Option 43 sub-options 4 and 5: seconds a client listens before opening a transfer,
    /// and before reopening one.
    pub mtftp_timeout: u8,
    pub mtftp_delay: u8,
    pub negotiator: NegotiatorConfig,
    /// A client that asked this long ago and was never answered is forgotten (it asks
    /// again if it still wants the file).
    pub forget_after: Duration,
}

impl MulticastConfig {
    /// From a `[negotiate]` section, for the host whose address is `id`.
    pub fn from_section(section: &NegotiateConfig, id: Ipv4Addr) -> MulticastConfig {
        MulticastConfig {
            boot_files: section.boot_files.clone(),
            mtftp_timeout: section.mtftp_timeout,
            mtftp_delay: section.mtftp_delay,
            negotiator: section.negotiator_config(id),
            forget_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BootServerConfig {
    /// Option 54 of every answer.
    pub server_ip: Ipv4Addr,
    /// Where answers go for a client that sent from no address (its port 68, or another in
    /// tests).
    pub client_port: u16,
    /// Answer a REQUEST without a boot item as the ProxyDHCP REQUEST (from the advisor).
    pub proxy_requests: bool,
    pub multicast: Option<MulticastConfig>,
}

/// What the shell records or traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEvent {
    /// A line for the client's boot trace (its request, `BOOTSERVER-ACK`).
    Trace(Trace),
    /// A datagram was not answered, and why.
    Dropped { from: SocketAddr, reason: String },
    /// A client got its multicast file. `cleared`: it waited for this assignment to be
    /// cleared (it is one of the clients the clearing answered); `waited` since its last
    /// REQUEST.
    Answered { client: MacAddr, assignment: Assignment, cleared: bool, waited: Duration },
    /// A client was sent a wait packet.
    Wait { client: MacAddr, file: String, wait: Duration },
    /// A client's file could not be set up anywhere.
    Failed { client: MacAddr, file: String, reason: &'static str },
    /// A slot turned out to be someone else's.
    Conflict { slot: Slot, file: String, by: Ipv4Addr },
    /// An assignment became usable.
    Activated(Assignment),
    /// An assignment ended.
    Released { assignment: Assignment, reason: &'static str },
}

/// Counts since the boot server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootStats {
    pub received: u64,
    pub dropped: u64,
    pub answered: u64,
    pub waits: u64,
    /// Requests refused because [`MAX_PENDING`] clients were waiting.
    pub refused_busy: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    to: SocketAddrV4,
    req: DhcpMessage,
    item: BootItem,
    since: Instant,
}

/// The boot server on port 4011; see the module documentation.
pub struct BootServer<A> {
    cfg: BootServerConfig,
    advisor: A,
    negotiator: Option<Negotiator>,
    pending: HashMap<MacAddr, Pending>,
    /// The file of the assignment that just activated: the `Ready`s that follow it at once
    /// are its clearing's waiters.
    activated: Option<String>,
    out: VecDeque<(SocketAddrV4, Vec<u8>)>,
    events: VecDeque<BootEvent>,
    stats: BootStats,
}

fn mac_of(token: u64) -> MacAddr {
    let b = token.to_be_bytes();
    MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn token_of(mac: MacAddr) -> u64 {
    mac.0.iter().fold(0u64, |t, b| (t << 8) | u64::from(*b))
}

/// A DHCPACK to `req` from port 4011: option 60 `PXEClient`, option 54, no boot file yet.
fn ack_to(server: Ipv4Addr, req: &DhcpMessage) -> DhcpMessage {
    let mut r = reply_to(req, MessageType::Ack);
    r.ciaddr = req.ciaddr;
    r.set_option(opt::SERVER_ID, server.octets().to_vec());
    r.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
    r
}

/// The answer for a multicast file: the file, the file server as `siaddr`, option 43
/// sub-options 1-5 and the boot item echoed.
pub fn multicast_answer(server: Ipv4Addr, req: &DhcpMessage, item: BootItem, a: &Assignment, mtftp_timeout: u8, mtftp_delay: u8) -> DhcpMessage {
    let mut r = ack_to(server, req);
    r.siaddr = a.file_server;
    r.file = a.file.as_bytes().to_vec();
    let pxe = PxeOptions {
        mtftp_ip: Some(a.slot.group),
        mtftp_client_port: Some(a.slot.port),
        mtftp_server_port: Some(a.server_port),
        mtftp_timeout: Some(mtftp_timeout),
        mtftp_delay: Some(mtftp_delay),
        discovery_control: Some(discovery::USE_BOOTFILE),
        boot_item: Some(item),
        ..Default::default()
    };
    r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    r
}

/// The wait packet: a DHCPACK without a boot file (or MTFTP sub-options) whose option 43
/// echoes the boot item and carries [`SUB_WAIT_MS`] = `wait`.
pub fn wait_packet(server: Ipv4Addr, req: &DhcpMessage, item: BootItem, wait: Duration) -> DhcpMessage {
    let mut r = ack_to(server, req);
    let ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    let pxe = PxeOptions { boot_item: Some(item), other: vec![(SUB_WAIT_MS, ms.to_be_bytes().to_vec())], ..Default::default() };
    r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    r
}

impl<A: BootAdvisor> BootServer<A> {
    pub fn new(cfg: BootServerConfig, advisor: A) -> BootServer<A> {
        let negotiator = cfg.multicast.as_ref().map(|m| Negotiator::new(m.negotiator.clone()));
        BootServer {
            cfg,
            advisor,
            negotiator,
            pending: HashMap::new(),
            activated: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: BootStats::default(),
        }
    }

    pub fn config(&self) -> &BootServerConfig {
        &self.cfg
    }

    pub fn stats(&self) -> BootStats {
        self.stats
    }

    /// The negotiator of the multicast files, if any (its assignments, its config).
    pub fn negotiator(&self) -> Option<&Negotiator> {
        self.negotiator.as_ref()
    }

    /// Clients waiting for a multicast answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn event(&mut self, e: BootEvent) {
        if self.events.len() < MAX_QUEUED {
            self.events.push_back(e);
        }
    }

    fn answer(&mut self, to: SocketAddrV4, reply: &DhcpMessage) {
        if self.out.len() < MAX_QUEUED {
            self.stats.answered += 1;
            self.out.push_back((to, reply.encode()));
        }
    }

    fn drop(&mut self, from: SocketAddr, reason: String) {
        self.stats.dropped += 1;
        self.event(BootEvent::Dropped { from, reason });
    }

    /// A datagram that arrived on port 4011.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.received += 1;
        if let Err(reason) = self.decide(now, from, bytes) {
            self.drop(from, reason);
        }
    }

    /// A datagram on the negotiator's peer port (ignored without multicast files).
    pub fn handle_peer(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if let Some(n) = &mut self.negotiator {
            n.handle_peer(now, from, bytes);
            self.absorb(now);
        }
    }

    /// A datagram on the negotiator's file-server socket.
    pub fn handle_file_server(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if let Some(n) = &mut self.negotiator {
            n.handle_file_server(now, from, bytes);
            self.absorb(now);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(n) = &mut self.negotiator {
            n.handle_timeout(now);
            self.absorb(now);
        }
        if let Some(m) = &self.cfg.multicast {
            let keep = m.forget_after;
            self.pending.retain(|_, p| now.saturating_duration_since(p.since) < keep);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let forget = self.cfg.multicast.as_ref().map(|m| m.forget_after);
        let pending = forget.and_then(|f| self.pending.values().map(|p| p.since + f).min());
        let neg = self.negotiator.as_ref().and_then(|n| n.poll_timeout());
        pending.into_iter().chain(neg).min()
    }

    /// Appends the next answer to a client (it leaves from port 4011) to `buf`.
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let (to, bytes) = self.out.pop_front()?;
        Some(fleetboot_proto::append(buf, SocketAddr::V4(to), |b| b.extend_from_slice(&bytes)))
    }

    /// Appends the negotiator's next datagram to `buf`: to a file server
    /// ([`is_file_server`](Self::is_file_server)) it leaves from the file-server socket,
    /// otherwise from the peer port.
    pub fn poll_negotiation(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.negotiator.as_mut()?.poll_transmit(now, buf)
    }

    pub fn is_file_server(&self, to: SocketAddr) -> bool {
        self.negotiator.as_ref().is_some_and(|n| n.is_file_server(to))
    }

    pub fn poll_event(&mut self) -> Option<BootEvent> {
        self.events.pop_front()
    }

    fn decide(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> Result<(), String> {
        let msg = DhcpMessage::parse(bytes).map_err(|e| format!("malformed packet from {from}: {e}"))?;
        if msg.op != BOOTREQUEST {
            return Err(format!("op {} from {from} is not a BOOTREQUEST", msg.op));
        }
        let mt = msg.message_type().ok_or_else(|| format!("no valid message type from {from}"))?;
        let id = identify(&msg);
        self.event(BootEvent::Trace(Trace { mac: id.mac, kind: mt.name(), detail: describe_request(&msg, &id, PXE_PORT) }));
        if !matches!(mt, MessageType::Request | MessageType::Inform) {
            return Err(format!("port {PXE_PORT}: {} is not a boot server request", mt.name()));
        }
        if !(id.is_pxe || id.is_ipxe) {
            return Err(format!("port {PXE_PORT}: not a PXE client"));
        }
        let asked = msg.option(opt::VENDOR_SPECIFIC).and_then(|v| PxeOptions::decode(v).ok()).and_then(|p| p.boot_item);
        let to = match from {
            SocketAddr::V4(s) if nonzero(*s.ip()).is_some() => s,
            _ => match nonzero(msg.ciaddr) {
                Some(c) => SocketAddrV4::new(c, self.cfg.client_port),
                None => SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.client_port),
            },
        };
        let item = asked.unwrap_or(BootItem { server_type: BOOT_TYPE_BASE, layer: 0 });
        if let Some(file) = self.multicast_file(&msg, mt, asked) {
            return self.negotiate(now, msg, to, item, file);
        }
        // Answered from the boot profiles, the asked item echoed.
        let mut reply = reply_to(&msg, MessageType::Ack);
        reply.ciaddr = msg.ciaddr;
        reply.set_option(opt::SERVER_ID, self.cfg.server_ip.octets().to_vec());
        let pxe = |_: &BootOffer| PxeOptions { discovery_control: Some(discovery::USE_BOOTFILE), boot_item: Some(item), ..Default::default() };
        let file = add_boot_info(self.cfg.server_ip, &mut reply, &msg, &id, &self.advisor, pxe)
            .ok_or_else(|| format!("port {PXE_PORT}: no boot offer for this client"))?;
        self.answer(to, &reply);
        self.event(BootEvent::Trace(Trace { mac: id.mac, kind: "BOOTSERVER-ACK", detail: format!("file={file}") }));
        Ok(())
    }

    /// The multicast file a REQUEST asks for, if it asks for one.
    fn multicast_file(&self, msg: &DhcpMessage, mt: MessageType, asked: Option<BootItem>) -> Option<String> {
        let m = self.cfg.multicast.as_ref()?;
        if mt != MessageType::Request || !msg.vendor_class().is_some_and(|v| v.starts_with("PXEClient")) {
            return None;
        }
        let i = match asked {
            Some(item) => usize::from(item.server_type.checked_sub(BOOT_TYPE_BASE)?),
            None if self.cfg.proxy_requests => return None,
            None => 0,
        };
        m.boot_files.get(i).cloned()
    }

    fn negotiate(&mut self, now: Instant, req: DhcpMessage, to: SocketAddrV4, item: BootItem, file: String) -> Result<(), String> {
        let mac = req.mac();
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&mac) {
            self.stats.refused_busy += 1;
            return Err(format!("{MAX_PENDING} clients already wait for a multicast answer"));
        }
        self.pending.insert(mac, Pending { to, req, item, since: now });
        if let Some(n) = &mut self.negotiator {
            n.request(now, token_of(mac), &file);
        }
        self.absorb(now);
        Ok(())
    }

    /// Turns what the negotiator reports into answers, wait packets and records.
    fn absorb(&mut self, now: Instant) {
        self.activated = None;
        while let Some(e) = self.negotiator.as_mut().and_then(|n| n.poll_event()) {
            self.on_negotiator_event(now, e);
        }
        self.activated = None;
    }

    fn on_negotiator_event(&mut self, now: Instant, e: NegotiatorEvent) {
        let Some(m) = &self.cfg.multicast else { return };
        let (server, timeout, delay, wait) = (self.cfg.server_ip, m.mtftp_timeout, m.mtftp_delay, m.negotiator.wait_period);
        let cleared = matches!(&e, NegotiatorEvent::Ready { assignment, .. } if self.activated.as_deref() == Some(assignment.file.as_str()));
        self.activated = match &e {
            NegotiatorEvent::Activated(a) => Some(a.file.clone()),
            _ if cleared => self.activated.take(),
            _ => None,
        };
        match e {
            NegotiatorEvent::Ready { client, assignment } => {
                let Some(p) = self.pending.remove(&mac_of(client)) else { return };
                self.answer(p.to, &multicast_answer(server, &p.req, p.item, &assignment, timeout, delay));
                let waited = now.saturating_duration_since(p.since);
                self.event(BootEvent::Answered { client: mac_of(client), assignment, cleared, waited });
            }
            NegotiatorEvent::Wait { client, file } => {
                let Some(p) = self.pending.get(&mac_of(client)).cloned() else { return };
                self.stats.waits += 1;
                self.answer(p.to, &wait_packet(server, &p.req, p.item, wait));
                self.event(BootEvent::Wait { client: mac_of(client), file, wait });
            }
            NegotiatorEvent::Failed { client, file, reason } => {
                self.pending.remove(&mac_of(client));
                self.event(BootEvent::Failed { client: mac_of(client), file, reason });
            }
            NegotiatorEvent::Conflict { slot, file, by } => self.event(BootEvent::Conflict { slot, file, by }),
            NegotiatorEvent::Activated(a) => self.event(BootEvent::Activated(a)),
            NegotiatorEvent::Released { assignment, reason } => self.event(BootEvent::Released { assignment, reason }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::NoBootFiles;
    use fleetboot_negotiate::{ConflictOp, ConflictPacket, FsMessage, FsOp};

    const ME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
    const FS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 21), 4013);
    const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 12), 4012);

    fn multicast() -> MulticastConfig {
        let slots = (1..=4).map(|i| Slot { group: Ipv4Addr::new(239, 255, 1, i), port: 1758 }).collect();
        MulticastConfig {
            boot_files: vec!["a.0".into(), "b.efi".into()],
            mtftp_timeout: 3,
            mtftp_delay: 4,
            negotiator: NegotiatorConfig::new(ME, slots, 1759, vec![FS], vec![PEER]),
            forget_after: Duration::from_secs(60),
        }
    }

    fn server(proxy_requests: bool) -> BootServer<NoBootFiles> {
        BootServer::new(BootServerConfig { server_ip: ME, client_port: 68, proxy_requests, multicast: Some(multicast()) }, NoBootFiles)
    }

    fn discovery(mac: u8, item: Option<u16>, class: &str) -> DhcpMessage {
        let mut m = DhcpMessage { xid: 77, ciaddr: Ipv4Addr::new(10, 77, 0, 101), ..Default::default() };
        m.chaddr[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, mac]);
        m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
        m.set_option(opt::VENDOR_CLASS, class.as_bytes().to_vec());
        let pxe = PxeOptions { boot_item: item.map(|t| BootItem { server_type: t, layer: 0 }), ..Default::default() };
        m.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        m
    }

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 101), 40000);

    fn answers(b: &mut BootServer<NoBootFiles>, now: Instant) -> Vec<(SocketAddr, DhcpMessage)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = b.poll_transmit(now, &mut buf) {
            out.push((t.destination, DhcpMessage::parse(&buf[buf.len() - t.size..]).unwrap()));
        }
        out
    }

    fn negotiation(b: &mut BootServer<NoBootFiles>, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = b.poll_negotiation(now, &mut buf) {
            out.push((t.destination, buf[buf.len() - t.size..].to_vec()));
        }
        out
    }

    fn events(b: &mut BootServer<NoBootFiles>) -> Vec<BootEvent> {
        std::iter::from_fn(|| b.poll_event()).filter(|e| !matches!(e, BootEvent::Trace(_))).collect()
    }

    #[test]
    fn the_boot_item_selects_the_file() {
        let now = Instant::now();
        let asks = |proxy, msg: &DhcpMessage| {
            let mut b = server(proxy);
            b.handle(now, SocketAddr::V4(CLIENT), &msg.encode());
            events(&mut b)
                .into_iter()
                .find_map(|e| match e {
                    BootEvent::Wait { file, .. } => Some(file),
                    _ => None,
                })
        };
        let pxe = "PXEClient:Arch:00000:UNDI:002001";
        assert_eq!(asks(true, &discovery(3, Some(0x8001), pxe)).as_deref(), Some("b.efi"));
        assert_eq!(asks(true, &discovery(3, Some(0x8000), pxe)).as_deref(), Some("a.0"));
        // Without a boot item: the ProxyDHCP REQUEST inside `fleetboot serve`, the first
        // file for a negotiator on its own.
        assert_eq!(asks(true, &discovery(3, None, pxe)), None);
        assert_eq!(asks(false, &discovery(3, None, pxe)).as_deref(), Some("a.0"));
        assert_eq!(asks(true, &discovery(3, Some(0x8002), pxe)), None, "no such item");
        assert_eq!(asks(true, &discovery(3, Some(0x8000), "HTTPClient")), None);
    }

    #[test]
    fn the_answer_carries_the_mtftp_sub_options_and_a_wait_packet_only_the_wait() {
        let m = discovery(3, Some(0x8001), "PXEClient");
        let item = BootItem { server_type: 0x8001, layer: 0 };
        let a = Assignment {
            file: "b.efi".into(),
            file_server: Ipv4Addr::new(10, 77, 0, 21),
            server_port: 1759,
            slot: Slot { group: Ipv4Addr::new(239, 255, 1, 3), port: 1758 },
        };
        let r = DhcpMessage::parse(&multicast_answer(ME, &m, item, &a, 3, 4).encode()).unwrap();
        assert_eq!((r.op, r.xid, r.message_type()), (2, 77, Some(MessageType::Ack)));
        assert_eq!((r.siaddr, &r.file[..], r.server_id()), (a.file_server, &b"b.efi"[..], Some(ME)));
        let p = PxeOptions::decode(r.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
        assert_eq!((p.mtftp_ip, p.mtftp_client_port, p.mtftp_server_port), (Some(a.slot.group), Some(1758), Some(1759)));
        assert_eq!((p.mtftp_timeout, p.mtftp_delay, p.boot_item), (Some(3), Some(4), Some(item)));
        assert_eq!(crate::pxe::wait_period(&r), None);

        let w = DhcpMessage::parse(&wait_packet(ME, &m, item, Duration::from_millis(500)).encode()).unwrap();
        assert_eq!((w.op, w.xid, w.chaddr, w.ciaddr), (2, 77, m.chaddr, m.ciaddr));
        assert_eq!((w.message_type(), w.server_id(), w.vendor_class().as_deref()), (Some(MessageType::Ack), Some(ME), Some("PXEClient")));
        assert!(w.file.is_empty(), "a wait packet names no boot file");
        assert_eq!(w.siaddr, Ipv4Addr::UNSPECIFIED);
        let raw = w.option(opt::VENDOR_SPECIFIC).unwrap();
        // Sub-option 0xB0, length 4, 500 big-endian; then 71 (the boot item) and the end.
        assert!(raw.windows(6).any(|x| x == [SUB_WAIT_MS, 4, 0, 0, 0x01, 0xF4]), "{raw:02x?}");
        let p = PxeOptions::decode(raw).unwrap();
        assert_eq!(p, PxeOptions { boot_item: Some(item), other: vec![(SUB_WAIT_MS, vec![0, 0, 0x01, 0xF4])], ..Default::default() });
        assert_eq!(crate::pxe::wait_period(&w), Some(Duration::from_millis(500)));
        assert!((128..=254).contains(&SUB_WAIT_MS), "vendor range of PXE option 43");
    }

    /// Clearing starts (wait packet 1), a peer answers the query (a conflict: wait packet
    /// 2), the next slot clears and the file server ACKs (the answer, `cleared`); a second
    /// client for the same file is answered at once with no wait.
    #[test]
    fn clearing_sends_a_wait_packet_and_another_on_each_conflict() {
        let mut b = server(false);
        let mut now = Instant::now();
        let waits = |out: &[(SocketAddr, DhcpMessage)]| out.iter().filter(|(_, m)| crate::pxe::wait_period(m) == Some(Duration::from_secs(1))).count();
        b.handle(now, SocketAddr::V4(CLIENT), &discovery(3, Some(0x8000), "PXEClient").encode());
        let out = answers(&mut b, now);
        assert_eq!((out.len(), waits(&out), out[0].0), (1, 1, SocketAddr::V4(CLIENT)), "clearing started: one wait");
        let sent = negotiation(&mut b, now);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, SocketAddr::V4(PEER));
        assert!(!b.is_file_server(sent[0].0));
        let q = ConflictPacket::parse(&sent[0].1).unwrap();
        assert_eq!(q.op, ConflictOp::Query);
        b.handle_peer(now, SocketAddr::V4(PEER), &q.with_op(ConflictOp::Response).encode().unwrap());
        let out = answers(&mut b, now);
        assert_eq!((out.len(), waits(&out)), (1, 1), "the conflict: another wait");
        // Nobody answers for the next slot: PREPARE, ACK, the answer.
        let prep = loop {
            now = b.poll_timeout().unwrap();
            b.handle_timeout(now);
            if let Some((to, bytes)) = negotiation(&mut b, now).into_iter().find(|(to, _)| b.is_file_server(*to)) {
                assert_eq!(to, SocketAddr::V4(FS));
                break FsMessage::parse(&bytes).unwrap();
            }
        };
        assert_eq!(prep.op, FsOp::Prepare);
        b.handle_file_server(now, SocketAddr::V4(FS), &prep.reply(FsOp::Ack, None).encode().unwrap());
        let out = answers(&mut b, now);
        assert_eq!((out.len(), waits(&out)), (1, 0));
        assert_eq!(out[0].1.file, b"a.0");
        let group = PxeOptions::decode(out[0].1.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap().mtftp_ip;
        assert_ne!(group, Some(q.group), "not the conflicting group");
        // A second client: answered at once, no wait, not `cleared`.
        b.handle(now, SocketAddr::V4(CLIENT), &discovery(4, Some(0x8000), "PXEClient").encode());
        let out = answers(&mut b, now);
        assert_eq!((out.len(), waits(&out)), (1, 0));

        let ev = events(&mut b);
        let mac = |last| MacAddr([0x52, 0x54, 0, 1, 2, last]);
        let waits_of = |m| ev.iter().filter(|e| matches!(e, BootEvent::Wait { client, file, .. } if *client == m && file == "a.0")).count();
        assert_eq!(waits_of(mac(3)), 2);
        assert_eq!(waits_of(mac(4)), 0);
        assert_eq!(ev.iter().filter(|e| matches!(e, BootEvent::Conflict { .. })).count(), 1);
        let answered: Vec<(MacAddr, bool)> = ev
            .iter()
            .filter_map(|e| match e {
                BootEvent::Answered { client, cleared, .. } => Some((*client, *cleared)),
                _ => None,
            })
            .collect();
        assert_eq!(answered, [(mac(3), true), (mac(4), false)]);
        assert!(ev.iter().any(|e| matches!(e, BootEvent::Activated(a) if a.file == "a.0")));
        assert_eq!(b.pending(), 0);
    }

    /// A client that is never answered is forgotten after `forget_after`; the pending table
    /// is bounded.
    #[test]
    fn waiting_clients_are_forgotten_and_bounded() {
        let mut b = server(false);
        let t0 = Instant::now();
        for i in 0..3u8 {
            b.handle(t0, SocketAddr::V4(CLIENT), &discovery(i, Some(0x8000), "PXEClient").encode());
        }
        assert_eq!(b.pending(), 3);
        let later = t0 + Duration::from_secs(61);
        b.handle_timeout(later);
        assert_eq!(b.pending(), 0);
        assert!(b.poll_timeout().is_none_or(|t| t > later));
        for i in 0..MAX_PENDING + 5 {
            let mut m = discovery(0, Some(0x8000), "PXEClient");
            m.chaddr[..6].copy_from_slice(&(i as u64).to_be_bytes()[2..]);
            b.handle(later, SocketAddr::V4(CLIENT), &m.encode());
        }
        assert_eq!(b.pending(), MAX_PENDING);
        assert_eq!(b.stats().refused_busy, 5);
    }
}

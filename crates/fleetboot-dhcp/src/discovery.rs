//! The client side of port 4011: PXE boot server discovery as a ROM does it, sans-I/O, next
//! to [`DhcpClient`](crate::DhcpClient) (what comes before it) and the
//! [`BootServer`](crate::BootServer) (what answers it).
//!
//! A DHCPREQUEST (option 60 `PXEClient`, option 43 sub-option 71 = the boot server type) to
//! each boot server's port 4011 in turn, repeated every `resend` for `per_server` per server.
//! The answer is a DHCPACK with a boot file (for a multicast file, with option 43
//! sub-options 1-5: [`MulticastAnswer`]). A DHCPACK without a file carrying
//! [`SUB_WAIT_MS`](crate::pxe::SUB_WAIT_MS) is fleetboot's *wait packet*: the boot server is
//! clearing a multicast group with its peers. The client counts it, asks that server again
//! only after the period it names, and stays with it (up to `wait_cap` from its first
//! REQUEST to it) rather than moving on — the answer is on its way, and asking the next
//! boot server would start a second clearing.
//!
//! Unlike a full PXE ROM, the client does not first send the ProxyDHCP server a REQUEST on
//! 4011 for its ProxyDHCP ACK: the boot servers it needs are already in the ProxyDHCP
//! offer, and a boot server answers the discovery REQUEST itself.
//!
//! The machine asks forever (round robin); the caller decides how long a boot may take.
//! [`PxeDiscovery::restart`] sends it back to discovery at the next server (a transfer that
//! stalled after the answer, as a ROM that fails and retries would).

use crate::codec::{opt, DhcpMessage, MessageType, BOOTREPLY, BOOTREQUEST};
use crate::pxe::{wait_period, BootItem, PxeOptions};
use fleetboot_boot::MacAddr;
use fleetboot_proto::Transmit;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Where boot servers listen (PXE 2.1 §2.2.5).
pub const BOOT_SERVER_PORT: u16 = 4011;

/// The boot server discovery REQUEST: what a PXE ROM sends to port 4011 (chaddr, ciaddr,
/// options 60, 93, 94, 57, 97 when a UUID is given, and 43 with the boot item).
pub fn discovery_request(me: Ipv4Addr, mac: MacAddr, xid: u32, boot_type: u16, uuid: Option<[u8; 16]>) -> DhcpMessage {
    let mut req = DhcpMessage { op: BOOTREQUEST, xid, ciaddr: me, ..DhcpMessage::default() };
    req.set_mac(mac);
    let pxe = PxeOptions { boot_item: Some(BootItem { server_type: boot_type, layer: 0 }), ..Default::default() };
    req.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
    req.set_option(opt::MAX_MESSAGE_SIZE, 1260u16.to_be_bytes().to_vec());
    req.set_option(opt::VENDOR_CLASS, crate::client::IPXE_VENDOR_CLASS.as_bytes().to_vec());
    req.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    req.set_option(opt::CLIENT_NII, vec![1, 2, 1]);
    if let Some(u) = uuid {
        let mut v = vec![0];
        v.extend_from_slice(&u);
        req.set_option(opt::CLIENT_UUID, v);
    }
    req.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    req
}

/// Who asks, whom, and how patiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The client's address (ciaddr).
    pub me: Ipv4Addr,
    pub mac: MacAddr,
    pub xid: u32,
    pub boot_type: u16,
    /// Option 97, when given.
    pub uuid: Option<[u8; 16]>,
    /// Asked in turn, round robin.
    pub servers: Vec<Ipv4Addr>,
    /// UDP port of the boot servers (4011; tests on loopback use another).
    pub port: u16,
    /// How long one boot server gets before the next is asked.
    pub per_server: Duration,
    /// REQUESTs are repeated this often while no answer comes.
    pub resend: Duration,
    /// Wait packets keep the client with their server for at most this long.
    pub wait_cap: Duration,
}

impl DiscoveryConfig {
    /// 2 s per server, a REQUEST every 500 ms, wait packets obeyed for up to 10 s; the xid
    /// from the MAC.
    pub fn new(me: Ipv4Addr, mac: MacAddr, servers: &[Ipv4Addr], boot_type: u16) -> DiscoveryConfig {
        let m = mac.0;
        DiscoveryConfig {
            me,
            mac,
            xid: u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
            boot_type,
            uuid: None,
            servers: servers.to_vec(),
            port: BOOT_SERVER_PORT,
            per_server: Duration::from_secs(2),
            resend: Duration::from_millis(500),
            wait_cap: Duration::from_secs(10),
        }
    }
}

/// What happened, for a caller that reports progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A REQUEST goes to this boot server for the first time in its turn.
    Asking(Ipv4Addr),
    Wait { from: Ipv4Addr, period: Duration },
    /// A real answer ([`PxeDiscovery::answer`]).
    Answered(Ipv4Addr),
}

/// The multicast parameters of an answer (option 43 sub-options 1-5, `siaddr`, the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticastAnswer {
    pub file: String,
    /// Sub-options 1 and 2: where DATA is multicast.
    pub group: SocketAddrV4,
    /// `siaddr` and sub-option 3: where RRQs go.
    pub file_server: SocketAddrV4,
    /// Sub-option 4: how long to listen before opening a transfer.
    pub listen_timeout: Duration,
    /// Sub-option 5: how long to wait before reopening one.
    pub delay: Duration,
}

fn usable(a: &Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast())
}

impl MulticastAnswer {
    /// The parameters of a real answer. `Err` names the missing piece: a boot server that
    /// answers without them is not one a multicast client can use.
    pub fn of(ack: &DhcpMessage) -> Result<MulticastAnswer, String> {
        let p = PxeOptions::decode(ack.option(opt::VENDOR_SPECIFIC).ok_or("no option 43")?).map_err(|e| format!("option 43: {e}"))?;
        let end = ack.file.iter().position(|&c| c == 0).unwrap_or(ack.file.len());
        let file = String::from_utf8_lossy(&ack.file[..end]).into_owned();
        let group = SocketAddrV4::new(
            p.mtftp_ip.ok_or("no sub-option 1 (MTFTP group)")?,
            p.mtftp_client_port.ok_or("no sub-option 2 (MTFTP client port)")?,
        );
        if !group.ip().is_multicast() {
            return Err(format!("sub-option 1: {} is not a multicast group", group.ip()));
        }
        let file_server = SocketAddrV4::new(ack.siaddr, p.mtftp_server_port.ok_or("no sub-option 3 (MTFTP server port)")?);
        if !usable(file_server.ip()) {
            return Err(format!("siaddr {} is no file server", file_server.ip()));
        }
        let secs = |v: u8| Duration::from_secs(u64::from(v));
        Ok(MulticastAnswer {
            file,
            group,
            file_server,
            listen_timeout: secs(p.mtftp_timeout.ok_or("no sub-option 4 (MTFTP timeout)")?),
            delay: secs(p.mtftp_delay.ok_or("no sub-option 5 (MTFTP delay)")?),
        })
    }
}

#[derive(Debug, Clone)]
enum State {
    /// No boot server to ask.
    Idle,
    Asking { server: Ipv4Addr, asked: Instant, until: Instant, next_send: Instant },
    Answered { from: Ipv4Addr, ack: Box<DhcpMessage> },
}

/// One client's boot server discovery; see the module documentation.
#[derive(Debug)]
pub struct PxeDiscovery {
    cfg: DiscoveryConfig,
    request: Vec<u8>,
    /// Turns taken so far (the next server is `servers[turns % len]`).
    turns: usize,
    state: State,
    waits: u32,
    /// Replies that were not for this client or not usable.
    pub ignored: u32,
    events: VecDeque<DiscoveryEvent>,
}

impl PxeDiscovery {
    /// Starts asking the first server at `now` (the first REQUEST is ready at once).
    pub fn new(cfg: DiscoveryConfig, now: Instant) -> PxeDiscovery {
        let request = discovery_request(cfg.me, cfg.mac, cfg.xid, cfg.boot_type, cfg.uuid).encode();
        let mut d = PxeDiscovery { cfg, request, turns: 0, state: State::Idle, waits: 0, ignored: 0, events: VecDeque::new() };
        d.next_turn(now);
        d
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.cfg
    }

    /// Wait packets received so far.
    pub fn waits(&self) -> u32 {
        self.waits
    }

    /// Whether there was anyone to ask.
    pub fn has_servers(&self) -> bool {
        !self.cfg.servers.is_empty()
    }

    /// The answer: the boot server it came from and the DHCPACK.
    pub fn answer(&self) -> Option<(Ipv4Addr, &DhcpMessage)> {
        match &self.state {
            State::Answered { from, ack } => Some((*from, ack)),
            _ => None,
        }
    }

    fn next_turn(&mut self, now: Instant) {
        if self.cfg.servers.is_empty() {
            self.state = State::Idle;
            return;
        }
        let server = self.cfg.servers[self.turns % self.cfg.servers.len()];
        self.turns += 1;
        self.state = State::Asking { server, asked: now, until: now + self.cfg.per_server, next_send: now };
        self.events.push_back(DiscoveryEvent::Asking(server));
    }

    /// Back to discovery, at the next server (the answer led nowhere).
    pub fn restart(&mut self, now: Instant) {
        self.next_turn(now);
    }

    /// A datagram that arrived on the client's socket.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let State::Asking { asked, until, next_send, .. } = &mut self.state else { return };
        let (SocketAddr::V4(src), Ok(m)) = (from, DhcpMessage::parse(bytes)) else {
            self.ignored += 1;
            return;
        };
        if m.op != BOOTREPLY || m.xid != self.cfg.xid || m.mac() != self.cfg.mac || m.message_type() != Some(MessageType::Ack) {
            self.ignored += 1;
            return;
        }
        if let Some(w) = wait_period(&m) {
            self.waits += 1;
            *next_send = now + w;
            *until = (*until).max(*next_send + self.cfg.resend).min(*asked + self.cfg.wait_cap);
            self.events.push_back(DiscoveryEvent::Wait { from: *src.ip(), period: w });
            return;
        }
        self.events.push_back(DiscoveryEvent::Answered(*src.ip()));
        self.state = State::Answered { from: *src.ip(), ack: Box::new(m) };
    }

    /// The server's turn is over: the next one is asked.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::Asking { until, .. } = self.state {
            if now >= until {
                self.next_turn(now);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Asking { until, next_send, .. } => Some(until.min(next_send)),
            _ => None,
        }
    }

    /// The REQUEST, when one is due.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let State::Asking { server, next_send, .. } = &mut self.state else { return None };
        if now < *next_send {
            return None;
        }
        *next_send = now + self.cfg.resend;
        let to = SocketAddr::V4(SocketAddrV4::new(*server, self.cfg.port));
        Some(fleetboot_proto::append(buf, to, |b| b.extend_from_slice(&self.request)))
    }

    pub fn poll_event(&mut self) -> Option<DiscoveryEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_server::{multicast_answer, wait_packet};
    use fleetboot_negotiate::{Assignment, Slot};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x60, 0, 7]);

    fn sent(d: &mut PxeDiscovery, now: Instant) -> Vec<(SocketAddr, DhcpMessage)> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = d.poll_transmit(now, &mut buf) {
            out.push((t.destination, DhcpMessage::parse(&buf[buf.len() - t.size..]).unwrap()));
        }
        out
    }

    #[test]
    fn the_request_on_the_wire() {
        let req = discovery_request(ip("10.77.0.101"), MAC, 77, 0x8003, Some([9; 16]));
        let parsed = DhcpMessage::parse(&req.encode()).unwrap();
        assert_eq!(parsed.message_type(), Some(MessageType::Request));
        assert_eq!((parsed.mac(), parsed.xid, parsed.ciaddr), (MAC, 77, ip("10.77.0.101")));
        assert!(parsed.vendor_class().unwrap().starts_with("PXEClient"));
        assert_eq!(parsed.client_uuid(), Some([9; 16]));
        let pxe = PxeOptions::decode(parsed.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
        assert_eq!(pxe.boot_item.unwrap().server_type, 0x8003);
    }

    /// Round robin over the servers; a wait packet moves the next REQUEST to the period it
    /// names and keeps the client with that server (up to `wait_cap`); the answer ends it.
    #[test]
    fn asks_in_turn_obeys_wait_packets_and_takes_the_answer() {
        let t0 = Instant::now();
        let servers = [ip("10.77.0.11"), ip("10.77.0.12")];
        let cfg = DiscoveryConfig::new(ip("10.77.0.101"), MAC, &servers, 0x8001);
        let mut d = PxeDiscovery::new(cfg.clone(), t0);
        assert_eq!(d.poll_event(), Some(DiscoveryEvent::Asking(servers[0])));
        // REQUESTs at 0, 500, 1000, 1500 ms to the first server, then the second one.
        let mut now = t0;
        let mut to = Vec::new();
        while now < t0 + Duration::from_millis(2100) {
            d.handle_timeout(now);
            to.extend(sent(&mut d, now).into_iter().map(|(a, _)| (now - t0, a)));
            let next = d.poll_timeout().unwrap();
            assert!(next > now, "the contract: a timer past now after the timeout and the sends");
            now = next;
        }
        let at = |ms, s: Ipv4Addr| (Duration::from_millis(ms), SocketAddr::from((s, 4011)));
        assert_eq!(to, [at(0, servers[0]), at(500, servers[0]), at(1000, servers[0]), at(1500, servers[0]), at(2000, servers[1])]);
        assert_eq!(d.poll_event(), Some(DiscoveryEvent::Asking(servers[1])));
        // A wait packet of 3 s: nothing is sent until then, and the turn stretches past 2 s.
        let req = discovery_request(cfg.me, MAC, cfg.xid, 0x8001, None);
        let item = BootItem { server_type: 0x8001, layer: 0 };
        let wait = wait_packet(servers[1], &req, item, Duration::from_secs(3));
        let t = t0 + Duration::from_millis(2000);
        d.handle(t, SocketAddr::from((servers[1], 4011)), &wait.encode());
        assert_eq!(d.waits(), 1);
        assert!(sent(&mut d, t + Duration::from_millis(2999)).is_empty());
        d.handle_timeout(t + Duration::from_millis(2999));
        assert_eq!(sent(&mut d, t + Duration::from_secs(3)).len(), 1, "asked again after the wait");
        assert_eq!(d.poll_timeout(), Some(t + Duration::from_millis(3500)), "still with the second server");
        // Another client's answer, and garbage: ignored.
        let mut other = req.clone();
        other.xid += 1;
        let a = Assignment {
            file: "bios/pxelinux.0".into(),
            file_server: ip("10.77.0.21"),
            server_port: 1759,
            slot: Slot { group: ip("239.255.1.1"), port: 1758 },
        };
        d.handle(t, SocketAddr::from((servers[1], 4011)), &multicast_answer(servers[1], &other, item, &a, 1, 2).encode());
        d.handle(t, SocketAddr::from((servers[1], 4011)), b"\x02garbage");
        assert_eq!((d.ignored, d.answer().is_none()), (2, true));
        d.handle(t, SocketAddr::from((servers[1], 4011)), &multicast_answer(servers[1], &req, item, &a, 1, 2).encode());
        let (from, ack) = d.answer().unwrap();
        assert_eq!(from, servers[1]);
        let m = MulticastAnswer::of(ack).unwrap();
        assert_eq!((m.file.as_str(), m.group, m.file_server), ("bios/pxelinux.0", SocketAddrV4::new(ip("239.255.1.1"), 1758), SocketAddrV4::new(ip("10.77.0.21"), 1759)));
        assert_eq!((m.listen_timeout, m.delay), (Duration::from_secs(1), Duration::from_secs(2)));
        assert_eq!(d.poll_timeout(), None);
        // Back to discovery: the next server in turn (the first one again).
        d.restart(t);
        assert!(d.answer().is_none());
        assert_eq!(sent(&mut d, t)[0].0, SocketAddr::from((servers[0], 4011)));
    }

    #[test]
    fn answers_a_multicast_client_cannot_use_say_why() {
        let req = discovery_request(ip("10.77.0.101"), MAC, 1, 0x8000, None);
        let item = BootItem { server_type: 0x8000, layer: 0 };
        let a = Assignment {
            file: "f".into(),
            file_server: ip("10.77.0.21"),
            server_port: 1759,
            slot: Slot { group: ip("239.255.1.1"), port: 1758 },
        };
        let good = multicast_answer(ip("10.77.0.11"), &req, item, &a, 1, 1);
        assert!(MulticastAnswer::of(&good).is_ok());
        let mut no_group = good.clone();
        no_group.set_option(opt::VENDOR_SPECIFIC, PxeOptions::default().encode());
        assert!(MulticastAnswer::of(&no_group).unwrap_err().contains("sub-option 1"));
        let unicast = multicast_answer(ip("10.77.0.11"), &req, item, &Assignment { slot: Slot { group: ip("10.0.0.1"), port: 1 }, ..a.clone() }, 1, 1);
        assert!(MulticastAnswer::of(&unicast).unwrap_err().contains("multicast"));
        let mut none = good.clone();
        none.options.retain(|(c, _)| *c != opt::VENDOR_SPECIFIC);
        assert!(MulticastAnswer::of(&none).is_err());
        // A malformed wait value is not a wait.
        let mut odd = wait_packet(ip("10.77.0.11"), &req, item, Duration::from_millis(500));
        assert_eq!(wait_period(&odd), Some(Duration::from_millis(500)));
        let pxe = PxeOptions { other: vec![(crate::pxe::SUB_WAIT_MS, vec![1, 2])], ..Default::default() };
        odd.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        assert_eq!(wait_period(&odd), None);
        assert_eq!(wait_period(&good), None, "an answer is no wait packet");
    }

    #[test]
    fn no_servers_no_timers() {
        let mut d = PxeDiscovery::new(DiscoveryConfig::new(ip("10.0.0.1"), MAC, &[], 0x8000), Instant::now());
        assert!(!d.has_servers());
        assert_eq!((d.poll_timeout(), d.poll_event()), (None, None));
        assert!(d.poll_transmit(Instant::now(), &mut Vec::new()).is_none());
    }
}

//! The address service on port 67 as a state machine: datagrams in, datagrams and lease
//! changes out, following the contract of `fleetboot_proto` (`docs/ARCHITECTURE.md`, "The
//! state-machine contract"). Port 4011 is the [`BootServer`](crate::BootServer)'s.
//!
//! # Persist before send
//!
//! A reply that depends on a lease change (an ACK, a NAK that replaced nothing does not) is
//! **held inside the engine** until the shell says the change is durable. [`Engine::handle`]
//! queues an [`Event::Persist`] with a ticket; the shell writes the changes to its store and
//! calls [`Engine::committed`] with that ticket once they would survive a crash, and only
//! then does [`Engine::poll_transmit`] hand the replies out. [`Engine::commit_failed`]
//! drops them (the client asks again). So an ACK can never leave for a lease that is not on
//! disk, whatever order the shell drains things in. Offers are never persisted: losing one
//! costs the client a retry, not an address conflict, because a REQUEST is ACKed only after
//! the bind is checked again.
//!
//! # Time
//!
//! `now: Instant` for what lives in memory only (offers); `unix_secs` for lease and decline
//! expiry, which is persisted and must mean the same after a restart or on another host.
//! The shell passes both; the engine reads no clock.

use crate::codec::{opt, DhcpMessage, MessageType, BOOTREQUEST, FLAG_BROADCAST};
use crate::config::{ConfigError, EngineConfig, Mode, Subnet};
use crate::identify::identify;
use crate::leases::{ClientKey, Lease, LeaseTable, Now};
use crate::pxe::{discovery, PxeOptions};
use crate::reply::{add_boot_info, describe_request, discovery_options, nonzero, reply_to};
pub use crate::reply::{BootAdvisor, BootOffer, Trace, BOOT_SERVER_TYPE};
use fleetboot_boot::{ClientIdentity, MacAddr};
use fleetboot_proto::Transmit;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// PXE boot server discovery and ProxyDHCP requests.
pub const PXE_PORT: u16 = 4011;

/// Replies held for their lease change, at most: a shell that stopped committing must not
/// make the engine grow without bound. Past it the oldest are withheld (counted).
pub const MAX_HELD: usize = 65_536;

/// Names a batch of lease changes from [`Event::Persist`]; the shell hands it back to
/// [`Engine::committed`] or [`Engine::commit_failed`].
pub type Ticket = u64;

/// A change the shell must make durable before the replies of its [`Ticket`] leave. The
/// store is keyed by address: `Bound` and `Declined` replace whatever it holds for
/// `lease.ip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    Bound(Lease),
    Removed(Ipv4Addr),
    Declined(Lease),
}

/// What the shell acts on or records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Make `changes` durable, then call [`Engine::committed`]`(ticket)`; on failure
    /// [`Engine::commit_failed`]`(ticket)`. The replies that depend on them wait until then.
    Persist { ticket: Ticket, changes: Vec<LeaseChange> },
    /// A line for the client's boot trace.
    Trace(Trace),
    /// A datagram was not answered, and why.
    Dropped { from: SocketAddr, reason: String },
}

/// Counts since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub received: u64,
    pub dropped: u64,
    /// Replies handed to the shell.
    pub sent: u64,
    /// Replies dropped because their lease change could not be made durable (or too
    /// many waited).
    pub withheld: u64,
}

#[derive(Debug, Clone)]
struct Reply {
    to: SocketAddrV4,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct Held {
    mac: MacAddr,
    replies: Vec<Reply>,
}

/// One datagram's outcome, gathered while handling it.
struct Output {
    replies: Vec<Reply>,
    lease_changes: Vec<LeaseChange>,
    traces: Vec<Trace>,
    dropped: Option<String>,
}

impl Output {
    fn drop(&mut self, why: impl Into<String>) {
        self.dropped = Some(why.into());
    }

    fn trace(&mut self, mac: MacAddr, kind: &'static str, detail: impl Into<String>) {
        self.traces.push(Trace { mac, kind, detail: detail.into() });
    }

    fn reply(&mut self, reply: &DhcpMessage, to: SocketAddrV4) {
        self.replies.push(Reply { to, bytes: reply.encode() });
    }
}

/// The DHCP server (or ProxyDHCP server) on port 67; see the module documentation. `A`
/// decides what PXE and iPXE clients boot.
pub struct Engine<A> {
    config: EngineConfig,
    leases: LeaseTable,
    advisor: A,
    ready: VecDeque<Reply>,
    held: BTreeMap<Ticket, Held>,
    events: VecDeque<Event>,
    next_ticket: Ticket,
    stats: EngineStats,
}

fn ips(list: &[Ipv4Addr]) -> Vec<u8> {
    list.iter().flat_map(|ip| ip.octets()).collect()
}

fn with_file(detail: String, file: Option<&str>) -> String {
    match file {
        Some(f) => format!("{detail} file={f}"),
        None => detail,
    }
}

impl<A: BootAdvisor> Engine<A> {
    pub fn new(config: EngineConfig, advisor: A) -> Result<Engine<A>, ConfigError> {
        config.validate()?;
        let leases = LeaseTable::new(config.offer_hold_secs, config.decline_hold_secs);
        Ok(Engine {
            config,
            leases,
            advisor,
            ready: VecDeque::new(),
            held: BTreeMap::new(),
            events: VecDeque::new(),
            next_ticket: 1,
            stats: EngineStats::default(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    pub fn advisor(&self) -> &A {
        &self.advisor
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Replies waiting for their lease change to be committed.
    pub fn held(&self) -> usize {
        self.held.values().map(|h| h.replies.len()).sum()
    }

    /// Restores a persisted lease; call for every stored lease before the first `handle`.
    /// With servers sharing one store, also how another server's lease change arrives.
    pub fn load_lease(&mut self, lease: Lease) {
        self.leases.load(lease);
    }

    /// Another server sharing the store removed the lease of `ip` (released, or moved to
    /// another address): the address is free here too. Only while `mac` holds it here, so
    /// a late notice never drops a newer lease.
    pub fn forget_lease(&mut self, ip: Ipv4Addr, mac: MacAddr) -> bool {
        if self.leases.get(ip).is_some_and(|l| l.mac == mac) {
            self.leases.forget(ip)
        } else {
            false
        }
    }

    /// With servers sharing one pool: this server's share of it, searched first for new
    /// addresses (see [`Share`](crate::leases::Share)); `None` for the whole pool.
    pub fn set_share(&mut self, share: Option<crate::leases::Share>) {
        self.leases.set_share(share);
    }

    /// Handles one datagram that arrived on port 67 from `from`. `unix_secs` is the wall
    /// clock, for the expiry of the leases it binds (see the module documentation).
    pub fn handle(&mut self, now: Instant, unix_secs: u64, from: SocketAddr, bytes: &[u8]) {
        self.stats.received += 1;
        let mut out = Output { replies: Vec::new(), lease_changes: Vec::new(), traces: Vec::new(), dropped: None };
        self.decide(Now { at: now, unix: unix_secs }, from, bytes, &mut out);
        let mac = out.traces.first().map(|t| t.mac);
        for t in out.traces {
            self.events.push_back(Event::Trace(t));
        }
        if let Some(reason) = out.dropped {
            self.stats.dropped += 1;
            self.events.push_back(Event::Dropped { from, reason });
        }
        if out.lease_changes.is_empty() {
            self.ready.extend(out.replies);
            return;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        if self.held.len() >= MAX_HELD {
            if let Some((_, oldest)) = self.held.pop_first() {
                self.stats.withheld += oldest.replies.len() as u64;
            }
        }
        let mac = mac.unwrap_or(MacAddr([0; 6]));
        self.held.insert(ticket, Held { mac, replies: out.replies });
        self.events.push_back(Event::Persist { ticket, changes: out.lease_changes });
    }

    /// The lease changes of `ticket` are durable: its replies may leave.
    pub fn committed(&mut self, ticket: Ticket) {
        if let Some(h) = self.held.remove(&ticket) {
            self.ready.extend(h.replies);
        }
    }

    /// The lease changes of `ticket` could not be made durable: its replies never leave
    /// (the client asks again).
    pub fn commit_failed(&mut self, ticket: Ticket) {
        if let Some(h) = self.held.remove(&ticket) {
            self.stats.withheld += h.replies.len() as u64;
            if !h.replies.is_empty() {
                self.events.push_back(Event::Trace(Trace {
                    mac: h.mac,
                    kind: "REPLY-WITHHELD",
                    detail: format!("{} replies withheld: the lease change was not stored", h.replies.len()),
                }));
            }
        }
    }

    /// Sweeps expired offers (they block nothing, but a storm leaves thousands).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.leases.sweep_offers(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work: a second after the last
    /// sweep, while offers are pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.leases.next_sweep()
    }

    /// Appends the next reply that may leave to `buf`.
    pub fn poll_transmit(&mut self, _now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let r = self.ready.pop_front()?;
        self.stats.sent += 1;
        Some(fleetboot_proto::append(buf, SocketAddr::V4(r.to), |b| b.extend_from_slice(&r.bytes)))
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn decide(&mut self, now: Now, from: SocketAddr, bytes: &[u8], out: &mut Output) {
        let msg = match DhcpMessage::parse(bytes) {
            Ok(m) => m,
            Err(e) => return out.drop(format!("malformed packet from {from}: {e}")),
        };
        if msg.op != BOOTREQUEST {
            return out.drop(format!("op {} from {from} is not a BOOTREQUEST", msg.op));
        }
        let Some(mt) = msg.message_type() else {
            return out.drop(format!("no valid message type from {from} (plain BOOTP is not served)"));
        };
        let id = identify(&msg);
        out.trace(id.mac, mt.name(), describe_request(&msg, &id, SERVER_PORT));
        match self.config.mode {
            Mode::Server => self.server(now, &msg, mt, &id, out),
            Mode::Proxy => self.proxy(&msg, mt, &id, out),
        }
    }

    /// RFC 2131 §4.1: relay first, then a client that has an address, else broadcast — we
    /// cannot unicast to an address the client does not have yet without writing its ARP
    /// entry.
    fn destination(&self, req: &DhcpMessage, nak: bool) -> SocketAddrV4 {
        if let Some(g) = nonzero(req.giaddr) {
            SocketAddrV4::new(g, SERVER_PORT)
        } else if let (false, Some(c)) = (nak, nonzero(req.ciaddr)) {
            SocketAddrV4::new(c, self.config.client_port)
        } else {
            SocketAddrV4::new(Ipv4Addr::BROADCAST, self.config.client_port)
        }
    }

    /// Relayed requests belong to the relay's subnet; a client renewing from an address
    /// to that address's subnet; everything else to the subnet we sit on.
    fn subnet_for(&self, msg: &DhcpMessage) -> Option<&Subnet> {
        let find = |ip: Ipv4Addr| self.config.subnets.iter().find(|s| s.contains(ip));
        if let Some(g) = nonzero(msg.giaddr) {
            return find(g);
        }
        nonzero(msg.ciaddr).and_then(find).or_else(|| find(self.config.server_ip))
    }

    fn server(&mut self, now: Now, msg: &DhcpMessage, mt: MessageType, id: &ClientIdentity, out: &mut Output) {
        let client = ClientKey {
            mac: msg.mac(),
            client_id: msg.client_id(),
        };
        let Some(subnet) = self.subnet_for(msg).cloned() else {
            out.drop(format!(
                "no subnet for giaddr {} / server {}",
                msg.giaddr, self.config.server_ip
            ));
            return;
        };
        let foreign_server = msg.server_id().filter(|&s| s != self.config.server_ip);
        match mt {
            MessageType::Discover => {
                let chosen = self.leases.choose(
                    now,
                    client,
                    msg.requested_ip(),
                    &subnet,
                    &self.config.reservations,
                );
                let Some(ip) = chosen else {
                    out.drop(format!(
                        "no free address in {}/{}",
                        subnet.network, subnet.prefix_len
                    ));
                    return;
                };
                self.leases.offer(now.at, client, ip);
                let mut reply = self.lease_reply(msg, MessageType::Offer, ip, &subnet);
                let info = self.add_boot_info(&mut reply, msg, id);
                out.reply(&reply, self.destination(msg, false));
                out.trace(id.mac, "DHCPOFFER", with_file(ip.to_string(), info.as_deref()));
            }
            MessageType::Request => {
                if let Some(other) = foreign_server {
                    self.leases.forget_offers(client);
                    out.drop(format!("client chose server {other}"));
                    return;
                }
                let selecting = msg.server_id().is_some();
                let (ip, known) = if selecting {
                    // SELECTING: the address must be the one we offered (or otherwise free for it).
                    match msg.requested_ip().or(nonzero(msg.ciaddr)) {
                        Some(ip) => (ip, true),
                        None => return self.nak(msg, id, "REQUEST without an address", out),
                    }
                } else {
                    // INIT-REBOOT (option 50) or RENEWING/REBINDING (ciaddr): only the
                    // client's own lease, and not when a reservation now points elsewhere.
                    let Some(ip) = nonzero(msg.ciaddr).or(msg.requested_ip()) else {
                        out.drop("REQUEST with neither server id, requested address nor ciaddr");
                        return;
                    };
                    let own = self.leases.get(ip).is_some_and(|l| l.belongs_to(client));
                    let reserved_elsewhere = self.config.reservations.iter().any(|r| {
                        client.matches_reservation(r) && r.ip != ip && subnet.contains(r.ip)
                    });
                    (ip, subnet.contains(ip) && own && !reserved_elsewhere)
                };
                if !known {
                    if self.config.authoritative {
                        return self.nak(
                            msg,
                            id,
                            &format!("{ip} is not this client's address here"),
                            out,
                        );
                    }
                    out.drop(format!("{ip} unknown to us; not authoritative"));
                    return;
                }
                let bound = self.leases.bind(
                    now,
                    client,
                    ip,
                    subnet.lease_time,
                    msg.hostname(),
                    &subnet,
                    &self.config.reservations,
                );
                match bound {
                    Ok(b) => {
                        for old in b.replaced {
                            out.lease_changes.push(LeaseChange::Removed(old));
                        }
                        out.lease_changes.push(LeaseChange::Bound(b.lease));
                        let mut reply = self.lease_reply(msg, MessageType::Ack, ip, &subnet);
                        reply.ciaddr = msg.ciaddr;
                        let info = self.add_boot_info(&mut reply, msg, id);
                        out.reply(&reply, self.destination(msg, false));
                        out.trace(id.mac, "DHCPACK", with_file(ip.to_string(), info.as_deref()));
                    }
                    Err(e) => self.nak(msg, id, &format!("{ip} cannot be bound: {e:?}"), out),
                }
            }
            MessageType::Decline => {
                if foreign_server.is_some() {
                    return out.drop("DECLINE for another server");
                }
                let Some(ip) = msg.requested_ip() else {
                    return out.drop("DECLINE without requested address");
                };
                match self.leases.decline(now, client, ip) {
                    Some(lease) => {
                        out.trace(id.mac, "DECLINED", format!("{ip} quarantined"));
                        out.lease_changes.push(LeaseChange::Declined(lease));
                    }
                    None => out.drop(format!("DECLINE of {ip}, which the client does not hold")),
                }
            }
            MessageType::Release => {
                if foreign_server.is_some() {
                    return out.drop("RELEASE for another server");
                }
                if self.leases.release(client, msg.ciaddr) {
                    out.lease_changes.push(LeaseChange::Removed(msg.ciaddr));
                } else {
                    out.drop(format!(
                        "RELEASE of {}, which the client does not hold",
                        msg.ciaddr
                    ));
                }
            }
            MessageType::Inform => {
                let mut reply = reply_to(msg, MessageType::Ack);
                reply.ciaddr = msg.ciaddr;
                reply.set_option(opt::SERVER_ID, self.config.server_ip.octets().to_vec());
                self.add_subnet_options(&mut reply, msg, &subnet);
                let info = self.add_boot_info(&mut reply, msg, id);
                out.reply(&reply, self.destination(msg, false));
                out.trace(
                    id.mac,
                    "DHCPACK",
                    with_file(format!("inform {}", msg.ciaddr), info.as_deref()),
                );
            }
            MessageType::Offer | MessageType::Ack | MessageType::Nak => {
                out.drop(format!("{} from a client", mt.name()));
            }
        }
    }

    fn nak(&self, msg: &DhcpMessage, id: &ClientIdentity, why: &str, out: &mut Output) {
        let mut reply = reply_to(msg, MessageType::Nak);
        reply.set_option(opt::SERVER_ID, self.config.server_ip.octets().to_vec());
        reply.set_option(opt::MESSAGE, why.as_bytes().to_vec());
        if nonzero(msg.giaddr).is_some() {
            // RFC 2131 §4.3.2: the relay must broadcast a NAK to the client.
            reply.flags |= FLAG_BROADCAST;
        }
        out.reply(&reply, self.destination(msg, true));
        out.trace(id.mac, "DHCPNAK", why.to_string());
    }

    fn lease_reply(
        &self,
        msg: &DhcpMessage,
        mt: MessageType,
        ip: Ipv4Addr,
        subnet: &Subnet,
    ) -> DhcpMessage {
        let mut reply = reply_to(msg, mt);
        reply.yiaddr = ip;
        let t = subnet.lease_time;
        reply.set_option(opt::SERVER_ID, self.config.server_ip.octets().to_vec());
        reply.set_option(opt::LEASE_TIME, t.to_be_bytes().to_vec());
        reply.set_option(opt::RENEWAL_TIME, (t / 2).to_be_bytes().to_vec());
        reply.set_option(
            opt::REBINDING_TIME,
            ((t as u64 * 7 / 8) as u32).to_be_bytes().to_vec(),
        );
        self.add_subnet_options(&mut reply, msg, subnet);
        reply
    }

    /// The basics go to everyone whatever option 55 says (many clients omit it); extras
    /// only when asked for.
    fn add_subnet_options(&self, reply: &mut DhcpMessage, msg: &DhcpMessage, subnet: &Subnet) {
        reply.set_option(opt::SUBNET_MASK, subnet.mask().octets().to_vec());
        if let Some(r) = subnet.router {
            reply.set_option(opt::ROUTER, r.octets().to_vec());
        }
        if !subnet.dns.is_empty() {
            reply.set_option(opt::DNS, ips(&subnet.dns));
        }
        if let Some(d) = &subnet.domain {
            reply.set_option(opt::DOMAIN, d.as_bytes().to_vec());
        }
        if msg.parameter_list().contains(&opt::BROADCAST) {
            reply.set_option(opt::BROADCAST, subnet.broadcast().octets().to_vec());
        }
    }

    /// Adds boot information for PXE and iPXE clients in server mode.
    fn add_boot_info(&self, reply: &mut DhcpMessage, msg: &DhcpMessage, id: &ClientIdentity) -> Option<String> {
        add_boot_info(self.config.server_ip, reply, msg, id, &self.advisor, |_| PxeOptions {
            discovery_control: Some(discovery::USE_BOOTFILE),
            ..Default::default()
        })
    }

    /// ProxyDHCP on port 67: boot information for PXE clients, never an address.
    fn proxy(&self, msg: &DhcpMessage, mt: MessageType, id: &ClientIdentity, out: &mut Output) {
        if !(id.is_pxe || id.is_ipxe) {
            return out.drop("proxy mode: not a PXE client");
        }
        let (reply_type, kind) = match mt {
            MessageType::Discover => (MessageType::Offer, "PROXYOFFER"),
            MessageType::Request if msg.server_id().is_none_or(|s| s == self.config.server_ip) => {
                (MessageType::Ack, "PROXYACK")
            }
            _ => return out.drop(format!("proxy mode: {} is for the DHCP server", mt.name())),
        };
        let mut reply = reply_to(msg, reply_type);
        reply.set_option(opt::SERVER_ID, self.config.server_ip.octets().to_vec());
        // Legacy ROMs ignore a ProxyDHCP offer without a menu and boot server list (dnsmasq
        // always sends both); bit 3 makes everyone else take the file at once.
        let server = self.config.server_ip;
        let pxe = |_: &BootOffer| {
            let mut p = discovery_options(server, BOOT_SERVER_TYPE);
            p.discovery_control = p.discovery_control.map(|d| d | discovery::USE_BOOTFILE);
            p
        };
        let Some(file) = add_boot_info(server, &mut reply, msg, id, &self.advisor, pxe) else {
            return out.drop("proxy mode: no boot offer for this client");
        };
        let dest = match nonzero(msg.giaddr) {
            Some(g) => SocketAddrV4::new(g, SERVER_PORT),
            None => SocketAddrV4::new(Ipv4Addr::BROADCAST, self.config.client_port),
        };
        out.reply(&reply, dest);
        out.trace(id.mac, kind, format!("file={file}"));
    }

}

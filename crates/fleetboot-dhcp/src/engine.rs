//! The address service as a state machine: datagrams in, datagrams and lease changes out.
//!
//! [`Engine::handle`] does no I/O and reads no clock. The caller owns the sockets, the
//! store and time, and must apply [`Output::lease_changes`] durably before sending
//! [`Output::transmits`]: a client that got a DHCPACK for an address the store never
//! learned about could see that address handed to another client after a restart.

use crate::codec::{opt, DhcpMessage, MessageType, BOOTREPLY, BOOTREQUEST, FLAG_BROADCAST};
use crate::config::{ConfigError, EngineConfig, Mode, Subnet};
use crate::identify::{identify, is_http_client};
use crate::leases::{ClientKey, Lease, LeaseTable};
use crate::pxe::{discovery, BootItem, BootServer, IpxeOptions, MenuItem, MenuPrompt, PxeOptions};
use fleetboot_boot::{ClientIdentity, MacAddr};
use std::net::{Ipv4Addr, SocketAddrV4};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// PXE boot server discovery and ProxyDHCP requests.
pub const PXE_PORT: u16 = 4011;

/// The boot server type we announce in PXE menus (0x8000-0xFFFE are vendor types; type 0
/// would mean "boot from local disk" to many ROMs).
pub const BOOT_SERVER_TYPE: u16 = 0x8000;

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub bytes: &'a [u8],
    pub source: SocketAddrV4,
    /// The port it arrived on: 67, or 4011 for PXE boot server requests.
    pub local_port: u16,
}

/// What a client should boot, decided by the caller from its boot profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOffer {
    /// Boot file name (TFTP) or URL (HTTP Boot, iPXE scripts).
    pub file: String,
    pub next_server: Ipv4Addr,
}

/// Chooses boot information per client. Only asked for PXE or iPXE clients.
pub trait BootAdvisor {
    fn boot_for(&self, client: &ClientIdentity) -> Option<BootOffer>;

    /// When `offer`'s file is handed out by a PXE boot server on port 4011 of this host (a
    /// negotiator, which adds the MTFTP parameters): the boot server type the client must
    /// ask for. The DHCP or ProxyDHCP answer then sends the client to boot server discovery
    /// instead of letting it take the file straight away.
    fn discovery_type(&self, _client: &ClientIdentity, _offer: &BootOffer) -> Option<u16> {
        None
    }
}

impl<F: Fn(&ClientIdentity) -> Option<BootOffer>> BootAdvisor for F {
    fn boot_for(&self, client: &ClientIdentity) -> Option<BootOffer> {
        self(client)
    }
}

/// A datagram to send from port 67 (or 4011 for boot server replies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dest: SocketAddrV4,
    /// Send as a link-level broadcast (`dest` is then 255.255.255.255).
    pub broadcast: bool,
    pub bytes: Vec<u8>,
}

/// A change the caller must persist before transmitting. The store is keyed by address:
/// `Bound` and `Declined` replace whatever it holds for `lease.ip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    Bound(Lease),
    Removed(Ipv4Addr),
    Declined(Lease),
}

/// Something worth a log line, per client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub mac: MacAddr,
    pub kind: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub transmits: Vec<Transmit>,
    pub lease_changes: Vec<LeaseChange>,
    pub events: Vec<Event>,
    /// Why nothing was sent, when the packet was ignored or could not be read.
    pub dropped: Option<String>,
}

impl Output {
    fn drop(&mut self, why: impl Into<String>) {
        self.dropped = Some(why.into());
    }

    fn event(&mut self, mac: MacAddr, kind: &'static str, detail: impl Into<String>) {
        self.events.push(Event {
            mac,
            kind,
            detail: detail.into(),
        });
    }
}

pub struct Engine {
    config: EngineConfig,
    leases: LeaseTable,
}

/// Boot information as it went into a reply, for the log.
struct BootInfo {
    file: String,
}

fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

/// A reply skeleton carrying the fields RFC 2131 table 3 copies from the request.
fn reply_to(req: &DhcpMessage, mt: MessageType) -> DhcpMessage {
    DhcpMessage {
        op: BOOTREPLY,
        htype: req.htype,
        hlen: req.hlen,
        hops: req.hops,
        xid: req.xid,
        flags: req.flags,
        giaddr: req.giaddr,
        chaddr: req.chaddr,
        options: vec![(opt::MESSAGE_TYPE, vec![mt as u8])],
        ..DhcpMessage::default()
    }
}

fn ips(list: &[Ipv4Addr]) -> Vec<u8> {
    list.iter().flat_map(|ip| ip.octets()).collect()
}

/// RFC 2131 §4.1: relay first, then a client that has an address, else broadcast — we
/// cannot unicast to an address the client does not have yet without writing its ARP entry.
fn destination(req: &DhcpMessage, nak: bool) -> (SocketAddrV4, bool) {
    if let Some(g) = nonzero(req.giaddr) {
        (SocketAddrV4::new(g, SERVER_PORT), false)
    } else if let (false, Some(c)) = (nak, nonzero(req.ciaddr)) {
        (SocketAddrV4::new(c, CLIENT_PORT), false)
    } else {
        (SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT), true)
    }
}

fn transmit(out: &mut Output, reply: &DhcpMessage, (dest, broadcast): (SocketAddrV4, bool)) {
    out.transmits.push(Transmit {
        dest,
        broadcast,
        bytes: reply.encode(),
    });
}

fn with_file(detail: String, boot: &Option<BootInfo>) -> String {
    match boot {
        Some(b) => format!("{detail} file={}", b.file),
        None => detail,
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Engine, ConfigError> {
        config.validate()?;
        let leases = LeaseTable::new(config.offer_hold_secs, config.decline_hold_secs);
        Ok(Engine { config, leases })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Restores a persisted lease; call for every stored lease before the first `handle`.
    pub fn load_lease(&mut self, lease: Lease) {
        self.leases.load(lease);
    }

    /// Handles one datagram. Persist `lease_changes` before sending `transmits`.
    pub fn handle(&mut self, now: u64, incoming: Incoming<'_>, boot: &dyn BootAdvisor) -> Output {
        let mut out = Output::default();
        let msg = match DhcpMessage::parse(incoming.bytes) {
            Ok(m) => m,
            Err(e) => {
                out.drop(format!("malformed packet from {}: {e}", incoming.source));
                return out;
            }
        };
        if msg.op != BOOTREQUEST {
            out.drop(format!(
                "op {} from {} is not a BOOTREQUEST",
                msg.op, incoming.source
            ));
            return out;
        }
        let Some(mt) = msg.message_type() else {
            out.drop(format!(
                "no valid message type from {} (plain BOOTP is not served)",
                incoming.source
            ));
            return out;
        };
        let id = identify(&msg);
        out.event(
            id.mac,
            mt.name(),
            self.describe_request(&msg, &id, incoming.local_port),
        );
        if incoming.local_port == PXE_PORT {
            self.boot_server(&msg, mt, &id, incoming.source, boot, &mut out);
        } else {
            match self.config.mode {
                Mode::Server => self.server(now, &msg, mt, &id, boot, &mut out),
                Mode::Proxy => self.proxy(&msg, mt, &id, boot, &mut out),
            }
        }
        out
    }

    fn describe_request(&self, msg: &DhcpMessage, id: &ClientIdentity, port: u16) -> String {
        let mut d = format!("xid={:08x} port={port}", msg.xid);
        if let Some(ip) = msg.requested_ip() {
            d += &format!(" requested={ip}");
        }
        if let Some(ip) = nonzero(msg.ciaddr) {
            d += &format!(" ciaddr={ip}");
        }
        if let Some(ip) = nonzero(msg.giaddr) {
            d += &format!(" giaddr={ip}");
        }
        if let Some(v) = &id.vendor_class {
            d += &format!(" vendor={v:?}");
        }
        if id.is_ipxe {
            d += " ipxe";
        }
        d
    }

    /// Relayed requests belong to the relay's subnet; a client renewing from an address
    /// to that address's subnet; everything else to the subnet we sit on.
    fn subnet_for(&self, msg: &DhcpMessage) -> Option<&Subnet> {
        let find = |ip: Ipv4Addr| self.config.subnets.iter().find(|s| s.contains(ip));
        if let Some(g) = nonzero(msg.giaddr) {
            return find(g);
        }
        nonzero(msg.ciaddr)
            .and_then(find)
            .or_else(|| find(self.config.server_ip))
    }

    fn server(
        &mut self,
        now: u64,
        msg: &DhcpMessage,
        mt: MessageType,
        id: &ClientIdentity,
        boot: &dyn BootAdvisor,
        out: &mut Output,
    ) {
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
                self.leases.offer(now, client, ip);
                let mut reply = self.lease_reply(msg, MessageType::Offer, ip, &subnet);
                let info = self.add_boot_info(&mut reply, msg, id, boot);
                transmit(out, &reply, destination(msg, false));
                out.event(id.mac, "DHCPOFFER", with_file(ip.to_string(), &info));
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
                        let info = self.add_boot_info(&mut reply, msg, id, boot);
                        transmit(out, &reply, destination(msg, false));
                        out.event(id.mac, "DHCPACK", with_file(ip.to_string(), &info));
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
                        out.event(id.mac, "DECLINED", format!("{ip} quarantined"));
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
                let info = self.add_boot_info(&mut reply, msg, id, boot);
                transmit(out, &reply, destination(msg, false));
                out.event(
                    id.mac,
                    "DHCPACK",
                    with_file(format!("inform {}", msg.ciaddr), &info),
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
        transmit(out, &reply, destination(msg, true));
        out.event(id.mac, "DHCPNAK", why.to_string());
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
    fn add_boot_info(
        &self,
        reply: &mut DhcpMessage,
        msg: &DhcpMessage,
        id: &ClientIdentity,
        boot: &dyn BootAdvisor,
    ) -> Option<BootInfo> {
        self.add_boot_common(reply, msg, id, boot, |_| PxeOptions {
            discovery_control: Some(discovery::USE_BOOTFILE),
            ..Default::default()
        })
    }

    /// Option 43 that sends a PXE client to unicast boot server discovery: this server,
    /// boot server type `server_type`, chosen without a prompt (PXE 2.1 §2.2.1).
    fn discovery_options(&self, server_type: u16) -> PxeOptions {
        PxeOptions {
            discovery_control: Some(discovery::NO_BROADCAST | discovery::NO_MULTICAST),
            boot_servers: vec![BootServer {
                server_type,
                addrs: vec![self.config.server_ip],
            }],
            boot_menu: vec![MenuItem {
                server_type,
                description: "fleetboot".into(),
            }],
            menu_prompt: Some(MenuPrompt {
                timeout: 0,
                prompt: "fleetboot".into(),
            }),
            ..Default::default()
        }
    }

    fn add_boot_common(
        &self,
        reply: &mut DhcpMessage,
        msg: &DhcpMessage,
        id: &ClientIdentity,
        boot: &dyn BootAdvisor,
        pxe: impl FnOnce(&BootOffer) -> PxeOptions,
    ) -> Option<BootInfo> {
        if !(id.is_pxe || id.is_ipxe) {
            return None;
        }
        let offer = boot.boot_for(id)?;
        // iPXE takes the file and never runs boot server discovery.
        let pxe = match boot.discovery_type(id, &offer).filter(|_| !id.is_ipxe) {
            Some(t) => self.discovery_options(t),
            None => pxe(&offer),
        };
        let http = is_http_client(id);
        if http && !offer.file.contains("://") {
            // An HTTP Boot client cannot use a TFTP file name; a wrong answer is worse than none.
            return None;
        }
        reply.set_option(
            opt::VENDOR_CLASS,
            if http { "HTTPClient" } else { "PXEClient" }
                .as_bytes()
                .to_vec(),
        );
        if let Some(ns) = nonzero(offer.next_server) {
            reply.siaddr = ns;
            reply.sname = ns.to_string().into_bytes();
            reply.set_option(opt::TFTP_SERVER, ns.to_string().into_bytes());
        }
        // The file field holds 127 bytes plus NUL; longer names (URLs) go in option 67 only.
        if offer.file.len() < 128 {
            reply.file = offer.file.clone().into_bytes();
        }
        reply.set_option(opt::BOOTFILE, offer.file.clone().into_bytes());
        if id.is_pxe && !http {
            reply.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        }
        if let Some(uuid) = msg.option(opt::CLIENT_UUID) {
            reply.set_option(opt::CLIENT_UUID, uuid.to_vec());
        }
        if id.is_ipxe {
            reply.set_option(opt::IPXE_ENCAP, IpxeOptions { no_pxedhcp: true }.encode());
        }
        Some(BootInfo { file: offer.file })
    }

    /// ProxyDHCP on port 67: boot information for PXE clients, never an address.
    fn proxy(
        &self,
        msg: &DhcpMessage,
        mt: MessageType,
        id: &ClientIdentity,
        boot: &dyn BootAdvisor,
        out: &mut Output,
    ) {
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
        let pxe = |_: &BootOffer| {
            let mut p = self.discovery_options(BOOT_SERVER_TYPE);
            p.discovery_control = p.discovery_control.map(|d| d | discovery::USE_BOOTFILE);
            p
        };
        let Some(info) = self.add_boot_common(&mut reply, msg, id, boot, pxe) else {
            return out.drop("proxy mode: no boot offer for this client");
        };
        let dest = match nonzero(msg.giaddr) {
            Some(g) => (SocketAddrV4::new(g, SERVER_PORT), false),
            None => (SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT), true),
        };
        transmit(out, &reply, dest);
        out.event(id.mac, kind, format!("file={}", info.file));
    }

    /// Port 4011: PXE boot server discovery, and the ProxyDHCP REQUEST of PXE spec §2.2.
    fn boot_server(
        &self,
        msg: &DhcpMessage,
        mt: MessageType,
        id: &ClientIdentity,
        source: SocketAddrV4,
        boot: &dyn BootAdvisor,
        out: &mut Output,
    ) {
        if !matches!(mt, MessageType::Request | MessageType::Inform) {
            return out.drop(format!(
                "port {PXE_PORT}: {} is not a boot server request",
                mt.name()
            ));
        }
        if !(id.is_pxe || id.is_ipxe) {
            return out.drop(format!("port {PXE_PORT}: not a PXE client"));
        }
        // Echo the menu item the client asked for; the answer is for that item.
        let asked = msg
            .option(opt::VENDOR_SPECIFIC)
            .and_then(|v| PxeOptions::decode(v).ok())
            .and_then(|p| p.boot_item);
        let pxe = |_: &BootOffer| PxeOptions {
            discovery_control: Some(discovery::USE_BOOTFILE),
            boot_item: Some(asked.unwrap_or(BootItem {
                server_type: BOOT_SERVER_TYPE,
                layer: 0,
            })),
            ..Default::default()
        };
        let mut reply = reply_to(msg, MessageType::Ack);
        reply.ciaddr = msg.ciaddr;
        reply.set_option(opt::SERVER_ID, self.config.server_ip.octets().to_vec());
        let Some(info) = self.add_boot_common(&mut reply, msg, id, boot, pxe) else {
            return out.drop(format!("port {PXE_PORT}: no boot offer for this client"));
        };
        let dest = if nonzero(*source.ip()).is_some() {
            (source, false)
        } else if let Some(c) = nonzero(msg.ciaddr) {
            (SocketAddrV4::new(c, CLIENT_PORT), false)
        } else {
            (SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT), true)
        };
        transmit(out, &reply, dest);
        out.event(id.mac, "BOOTSERVER-ACK", format!("file={}", info.file));
    }
}

//! What the engine (port 67) and the boot server (port 4011) put in their answers: the
//! boot decision asked of a [`BootAdvisor`], and the reply skeletons and boot options both
//! build from it.

use crate::codec::{opt, DhcpMessage, MessageType, BOOTREPLY};
use crate::identify::is_http_client;
use crate::pxe::{discovery, BootServer, IpxeOptions, MenuItem, MenuPrompt, PxeOptions};
use fleetboot_boot::{ClientIdentity, MacAddr};
use std::net::Ipv4Addr;
use std::sync::Arc;

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

impl<T: BootAdvisor + ?Sized> BootAdvisor for Arc<T> {
    fn boot_for(&self, client: &ClientIdentity) -> Option<BootOffer> {
        (**self).boot_for(client)
    }

    fn discovery_type(&self, client: &ClientIdentity, offer: &BootOffer) -> Option<u16> {
        (**self).discovery_type(client, offer)
    }
}

/// An advisor with no boot files: a boot server that only hands out negotiated multicast
/// files (`fleetboot negotiate` on its own) answers nothing else.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBootFiles;

impl BootAdvisor for NoBootFiles {
    fn boot_for(&self, _: &ClientIdentity) -> Option<BootOffer> {
        None
    }
}

/// A line for a client's boot trace (`fleetboot trace MAC`): what arrived or left, and
/// the detail worth keeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub mac: MacAddr,
    /// `DHCPDISCOVER`, `DHCPACK`, `PROXYOFFER`, `BOOTSERVER-ACK`, ...
    pub kind: &'static str,
    pub detail: String,
}

/// The boot server type announced in PXE menus (0x8000-0xFFFE are vendor types; type 0
/// would mean "boot from local disk" to many ROMs).
pub const BOOT_SERVER_TYPE: u16 = 0x8000;

pub(crate) fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

/// A reply skeleton carrying the fields RFC 2131 table 3 copies from the request.
pub(crate) fn reply_to(req: &DhcpMessage, mt: MessageType) -> DhcpMessage {
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

/// Option 43 that sends a PXE client to unicast boot server discovery: `server`, boot
/// server type `server_type`, chosen without a prompt (PXE 2.1 §2.2.1).
pub(crate) fn discovery_options(server: Ipv4Addr, server_type: u16) -> PxeOptions {
    PxeOptions {
        discovery_control: Some(discovery::NO_BROADCAST | discovery::NO_MULTICAST),
        boot_servers: vec![BootServer { server_type, addrs: vec![server] }],
        boot_menu: vec![MenuItem { server_type, description: "fleetboot".into() }],
        menu_prompt: Some(MenuPrompt { timeout: 0, prompt: "fleetboot".into() }),
        ..Default::default()
    }
}

/// Adds the boot information for a PXE or iPXE client to `reply`: the advisor's file,
/// next server, option 43 (`pxe`, unless the file is handed out by boot server discovery,
/// which gets [`discovery_options`]), iPXE's option 175. Returns the file, or `None` (and
/// leaves `reply` alone) for a client that gets no boot information.
pub(crate) fn add_boot_info(
    server: Ipv4Addr,
    reply: &mut DhcpMessage,
    msg: &DhcpMessage,
    id: &ClientIdentity,
    boot: &dyn BootAdvisor,
    pxe: impl FnOnce(&BootOffer) -> PxeOptions,
) -> Option<String> {
    if !(id.is_pxe || id.is_ipxe) {
        return None;
    }
    let offer = boot.boot_for(id)?;
    // iPXE takes the file and never runs boot server discovery.
    let pxe = match boot.discovery_type(id, &offer).filter(|_| !id.is_ipxe) {
        Some(t) => discovery_options(server, t),
        None => pxe(&offer),
    };
    let http = is_http_client(id);
    if http && !offer.file.contains("://") {
        // An HTTP Boot client cannot use a TFTP file name; a wrong answer is worse than none.
        return None;
    }
    reply.set_option(opt::VENDOR_CLASS, if http { "HTTPClient" } else { "PXEClient" }.as_bytes().to_vec());
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
    Some(offer.file)
}

/// What goes in a client's trace about its request: transaction, addresses, vendor.
pub(crate) fn describe_request(msg: &DhcpMessage, id: &ClientIdentity, port: u16) -> String {
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

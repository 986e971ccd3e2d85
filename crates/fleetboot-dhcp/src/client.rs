//! The client side of DHCP, as iPXE firmware does it: DISCOVER → first OFFER → REQUEST →
//! ACK, sans-I/O. The boot-storm emulator runs hundreds of these; the tests run them
//! against the real [`Engine`](crate::Engine) in memory.
//!
//! Like the server side, [`DhcpClient`] opens no socket and reads no clock, and follows the
//! `fleetboot_proto` contract: the caller passes `now` in, feeds received datagrams to
//! [`DhcpClient::handle`] (what is not for this client is counted and dropped: see
//! [`ClientStats`]), calls [`DhcpClient::handle_timeout`] when [`DhcpClient::poll_timeout`]
//! passes, and sends what [`DhcpClient::poll_transmit`] appends to its buffer.
//!
//! # What it sends
//!
//! Every DISCOVER and REQUEST carries what the lab captured from QEMU's iPXE: option 60
//! `PXEClient:Arch:00000:UNDI:002001`, 93 (arch), 94 (UNDI 2.1), 97 (UUID), 77 `iPXE`,
//! 175 (iPXE features), 61 (client id), 57 = 1472 and 55 (iPXE's parameter list), with the
//! broadcast flag set (the client has no address to receive unicast on).
//!
//! # Timers
//!
//! A request is resent after `initial_timeout`, doubling up to `max_timeout` (RFC 2131
//! §4.1), each wait stretched by up to a quarter by a jitter drawn deterministically from
//! the transaction id, so a storm of clients does not retransmit in lock step. A REQUEST
//! unanswered `request_attempts` times, or answered with a NAK, sends the client back to
//! DISCOVER with a new transaction id; `discover_attempts` unanswered DISCOVERs (or
//! `max_restarts` restarts) fail it.
//!
//! # Keeping a lease
//!
//! A client built with [`ClientConfig::renew`] set keeps its lease the way RFC 2131 §4.4.5
//! says: at T1 (option 58, else half the lease) it unicasts a REQUEST with `ciaddr` to its
//! server (RENEWING), at T2 (option 59, else 7/8 of the lease) it broadcasts one
//! (REBINDING), each retried after half the time left to the next boundary (never sooner
//! than `initial_timeout`, which stands in for RFC 2131's 60-second floor so short test
//! leases work). Every renewal ACK is reported as [`ClientEvent::Bound`] again, with the
//! new times in [`DhcpClient::lease_times`]. A NAK or the end of the lease loses it:
//! [`ClientError::LeaseLost`]. [`DhcpClient::decline`] sends a DECLINE for an address
//! found in use (RFC 5227 conflict) and gives it up. Messages sent from the bound address
//! (RENEW, REBIND, RELEASE) carry it as their source (`Transmit::source`,
//! [`ClientTransmit::source`]).
//!
//! # ProxyDHCP offers
//!
//! An OFFER without an address (`yiaddr` 0) whose option 60 is `PXEClient` is a ProxyDHCP
//! offer (PXE spec 2.1 §2.2): boot information from a server that hands out no addresses.
//! It never takes part in address selection, but the first one (with a server id) is kept
//! as a [`ProxyOffer`] on the [`Binding`] (and in [`DhcpClient::proxy_offer`]): a PXE client
//! sends its boot server discovery where it says. It is remembered while selecting,
//! requesting or bound, because it answers the same DISCOVER as the DHCP server's OFFER and
//! may arrive after the client already took that one.

use crate::codec::{opt, DhcpMessage, MessageType, BOOTREPLY, FLAG_BROADCAST};
use crate::engine::SERVER_PORT;
use crate::pxe::PxeOptions;
use fleetboot_boot::MacAddr;
use fleetboot_proto::Transmit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Option 60 of iPXE on x86 BIOS.
pub const IPXE_VENDOR_CLASS: &str = "PXEClient:Arch:00000:UNDI:002001";

/// Option 55 as iPXE sends it.
pub const IPXE_PARAMETER_LIST: &[u8] = &[
    1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130, 131, 132, 133, 134, 135, 175,
    203,
];

/// Option 175 as captured from QEMU's iPXE (bus id, and feature 19 = HTTP).
pub const IPXE_ENCAP: &[u8] = &[0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e, 0x13, 0x01, 0x01];

/// Option 55 of a PXE 2.1 ROM before any NBP runs: the options the spec requires a PXE
/// client to ask for (43 and 60 among them, 128-135 for the boot server) plus the usual
/// network ones.
pub const PXE_PARAMETER_LIST: &[u8] = &[
    1, 2, 3, 5, 6, 11, 12, 13, 15, 16, 17, 18, 43, 54, 60, 67, 128, 129, 130, 131, 132, 133, 134,
    135,
];

/// Option 55 of a plain host keeping a lease: mask, router, DNS, lease time, server id,
/// T1, T2.
pub const HOST_PARAMETER_LIST: &[u8] = &[1, 3, 6, 51, 54, 58, 59];

/// Who the client is and how patient it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub mac: MacAddr,
    /// Option 61; empty means none is sent.
    pub client_id: Vec<u8>,
    /// Option 97 (sent as type 0 followed by these 16 bytes).
    pub uuid: [u8; 16],
    /// Option 60.
    pub vendor_class: String,
    /// Option 93.
    pub arch: u16,
    /// Option 77; `None` sends none (a PXE ROM that is not iPXE yet).
    pub user_class: Option<Vec<u8>>,
    /// Option 175; `None` sends none.
    pub ipxe_encap: Option<Vec<u8>>,
    /// Option 57.
    pub max_message_size: u16,
    /// Option 55.
    pub parameter_list: Vec<u8>,
    /// First retransmission timeout.
    pub initial_timeout: Duration,
    /// Retransmission timeouts double up to this.
    pub max_timeout: Duration,
    /// DISCOVERs sent without any OFFER before the client gives up.
    pub discover_attempts: u32,
    /// REQUESTs sent without an answer before the client starts over with a DISCOVER.
    pub request_attempts: u32,
    /// Restarts (after a NAK or an unanswered REQUEST) before the client gives up.
    pub max_restarts: u32,
    /// The servers' UDP port (67): DISCOVER and REQUEST go to 255.255.255.255 on it,
    /// RELEASE to the server.
    pub server_port: u16,
    /// Send the PXE identity (options 60, 93, 94, 97, and 77/175 when set). A plain host
    /// ([`ClientConfig::host`]) sends none of them.
    pub send_pxe_identity: bool,
    /// Set the broadcast flag on DISCOVER and REQUEST: the client cannot receive unicast
    /// before its address is configured (and with a `chaddr` that is not the interface's
    /// own MAC, never at the link layer).
    pub broadcast: bool,
    /// Keep the lease once bound: renew at T1, rebind at T2, lose it at expiry (see the
    /// module documentation). Off for a booting client, whose boot is shorter than a lease.
    pub renew: bool,
}

impl ClientConfig {
    /// An iPXE client on x86 BIOS with this MAC: client id `01:MAC`, the UUID given.
    pub fn ipxe(mac: MacAddr, uuid: [u8; 16]) -> ClientConfig {
        let mut client_id = vec![1];
        client_id.extend_from_slice(&mac.0);
        ClientConfig {
            mac,
            client_id,
            uuid,
            vendor_class: IPXE_VENDOR_CLASS.into(),
            arch: 0,
            user_class: Some(b"iPXE".to_vec()),
            ipxe_encap: Some(IPXE_ENCAP.to_vec()),
            max_message_size: 1472,
            parameter_list: IPXE_PARAMETER_LIST.to_vec(),
            initial_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(10),
            discover_attempts: 10,
            request_attempts: 4,
            max_restarts: 5,
            server_port: SERVER_PORT,
            send_pxe_identity: true,
            broadcast: true,
            renew: false,
        }
    }

    /// A plain host that wants an address and keeps it: `chaddr` = `mac`, option 61 =
    /// `client_id`, no PXE identity, option 55 asking for what a lease needs (mask, router,
    /// lease time, server id, T1, T2), the broadcast flag set, renewals on.
    pub fn host(mac: MacAddr, client_id: Vec<u8>) -> ClientConfig {
        ClientConfig {
            client_id,
            vendor_class: String::new(),
            user_class: None,
            ipxe_encap: None,
            max_message_size: 1472,
            parameter_list: HOST_PARAMETER_LIST.to_vec(),
            send_pxe_identity: false,
            renew: true,
            ..ClientConfig::ipxe(mac, [0; 16])
        }
    }

    /// A PXE ROM on x86 BIOS that is not iPXE (no option 77 or 175): what boots with PXE
    /// MTFTP. Option 57 = 1260 as Intel's ROMs send it; otherwise like [`ipxe`](Self::ipxe).
    pub fn pxe(mac: MacAddr, uuid: [u8; 16]) -> ClientConfig {
        ClientConfig {
            user_class: None,
            ipxe_encap: None,
            max_message_size: 1260,
            parameter_list: PXE_PARAMETER_LIST.to_vec(),
            ..ClientConfig::ipxe(mac, uuid)
        }
    }
}

/// A ProxyDHCP offer: where a PXE client goes for its boot server discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOffer {
    /// Option 54: the ProxyDHCP server (which also answers on UDP 4011).
    pub server: Ipv4Addr,
    /// Option 43 decoded; `None` when absent or malformed (a malformed option 43 is no
    /// reason to drop the rest of the offer).
    pub pxe: Option<PxeOptions>,
    /// Option 67, else the `file` field; `None` when both are empty.
    pub file: Option<String>,
    /// `siaddr`, else option 66 when it is an address.
    pub next_server: Option<Ipv4Addr>,
}

/// What the client learned from its ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub ip: Ipv4Addr,
    /// Option 54 of the ACK (else of the OFFER).
    pub server_id: Ipv4Addr,
    /// From option 1; 24 when the server sent no mask (or a non-contiguous one).
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    /// Option 51, seconds; `None` when absent.
    pub lease_time: Option<u32>,
    /// Option 67, else the `file` field; `None` when both are empty.
    pub boot_file: Option<String>,
    /// `siaddr`, else option 66 when it is an address; `None` when neither is given.
    pub next_server: Option<Ipv4Addr>,
    /// The first ProxyDHCP offer heard, if any (see the module documentation).
    pub proxy: Option<ProxyOffer>,
}

/// Why the client stopped trying.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// `discover_attempts` DISCOVERs went unanswered.
    NoOffer { attempts: u32 },
    /// Too many NAKs or unanswered REQUESTs.
    TooManyRestarts { restarts: u32, last: String },
    /// A bound lease ended: NAKed while renewing or rebinding, or it expired.
    LeaseLost { ip: Ipv4Addr, why: String },
    /// The address was declined ([`DhcpClient::decline`]): it is in use by someone else.
    Declined { ip: Ipv4Addr },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoOffer { attempts } => {
                write!(f, "no DHCPOFFER after {attempts} DHCPDISCOVERs")
            }
            ClientError::TooManyRestarts { restarts, last } => {
                write!(f, "gave up after {restarts} restarts (last: {last})")
            }
            ClientError::LeaseLost { ip, why } => write!(f, "lease on {ip} lost: {why}"),
            ClientError::Declined { ip } => {
                write!(f, "{ip} declined: another host uses it")
            }
        }
    }
}

impl std::error::Error for ClientError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Sending DISCOVERs, waiting for the first OFFER.
    Selecting,
    /// Sent a REQUEST for `offered` to `server_id`, waiting for ACK or NAK.
    Requesting {
        offered: Ipv4Addr,
        server_id: Ipv4Addr,
    },
    Bound(Binding),
    /// A RELEASE was queued; the client holds nothing any more.
    Released,
    /// A DECLINE was queued ([`DhcpClient::decline`]); the client holds nothing any more.
    Declined,
    Failed(ClientError),
}

/// Something the caller may want to log or time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The first OFFER of this round was taken.
    Offered {
        ip: Ipv4Addr,
        server_id: Ipv4Addr,
    },
    Bound(Binding),
    /// A NAK arrived; the client starts over.
    Nak {
        message: Option<String>,
    },
    /// The REQUEST went unanswered `request_attempts` times; the client starts over.
    RequestTimedOut,
    Failed(ClientError),
}

/// When a kept lease ([`ClientConfig::renew`]) moves on; all relative to the last ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// When the last ACK arrived.
    pub bound_at: Instant,
    /// T1: RENEWING starts.
    pub renew_at: Instant,
    /// T2: REBINDING starts.
    pub rebind_at: Instant,
    /// The lease ends.
    pub expires_at: Instant,
}

impl LeaseTimes {
    /// From option 51 (seconds) and options 58/59 when present and consistent
    /// (T1 <= T2 <= lease), else T1 = 1/2 and T2 = 7/8 of the lease.
    pub fn new(bound_at: Instant, lease: u32, t1: Option<u32>, t2: Option<u32>) -> LeaseTimes {
        let ms = u64::from(lease) * 1000;
        let (mut t1, mut t2) = (
            t1.map(|t| u64::from(t) * 1000).unwrap_or(ms / 2),
            t2.map(|t| u64::from(t) * 1000).unwrap_or(ms * 7 / 8),
        );
        if !(t1 <= t2 && t2 <= ms) {
            (t1, t2) = (ms / 2, ms * 7 / 8);
        }
        let at = |ms| bound_at + Duration::from_millis(ms);
        LeaseTimes {
            bound_at,
            renew_at: at(t1),
            rebind_at: at(t2),
            expires_at: at(ms),
        }
    }
}

/// Where a kept lease is between its ACKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalPhase {
    /// Before T1.
    Bound,
    /// Between T1 and T2: unicast REQUESTs to the server.
    Renewing,
    /// Between T2 and expiry: broadcast REQUESTs to any server.
    Rebinding,
}

/// A datagram to send from port 68.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTransmit {
    /// 255.255.255.255:67 for DISCOVER, REQUEST, REBIND and DECLINE; the server's address
    /// for RENEW and RELEASE.
    pub dest: SocketAddrV4,
    /// The bound address the datagram must leave from (RENEW, REBIND, RELEASE: it is in
    /// `ciaddr` and the server answers there); `None` means 0.0.0.0.
    pub source: Option<Ipv4Addr>,
    pub message_type: MessageType,
    pub bytes: Vec<u8>,
}

/// Counts for the report: what was sent, how much of it was a retransmission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub discovers: u32,
    pub requests: u32,
    /// DISCOVERs and REQUESTs sent again because no answer came in time.
    pub retransmits: u32,
    pub offers: u32,
    pub naks: u32,
    pub restarts: u32,
    /// Replies that were for this client but not usable (wrong type or server, no address).
    pub ignored: u32,
    /// Datagrams that were not a DHCP reply, or another client's.
    pub not_ours: u32,
}

/// Why [`DhcpClient::handle`] did not use a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    Malformed(String),
    NotAReply,
    /// Another client's transaction (xid or chaddr differ).
    NotOurs,
    /// Ours, but nothing the current state waits for.
    Unexpected(&'static str),
}

/// One DHCP client; see the module documentation.
#[derive(Debug)]
pub struct DhcpClient {
    config: ClientConfig,
    xid: u32,
    state: ClientState,
    /// When this round (DISCOVER) started, for the `secs` field.
    started: Instant,
    /// Sends of the current message so far (DISCOVER or REQUEST).
    attempts: u32,
    timeout: Duration,
    deadline: Option<Instant>,
    pending: Option<MessageType>,
    rng: u64,
    stats: ClientStats,
    events: Vec<ClientEvent>,
    /// The first ProxyDHCP offer, kept across restarts: it describes the network's boot
    /// servers, not this transaction.
    proxy: Option<ProxyOffer>,
    /// Timers of a kept lease (set by the ACK when `config.renew`).
    lease: Option<LeaseTimes>,
    phase: RenewalPhase,
    /// The address of a DECLINE to send (the binding is gone by then).
    declining: Option<(Ipv4Addr, Ipv4Addr)>,
}

fn ip_of(v: &[u8]) -> Option<Ipv4Addr> {
    match v {
        &[a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

fn text(v: &[u8]) -> Option<String> {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    let s = String::from_utf8_lossy(&v[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}

/// Option 67, else the `file` field.
fn boot_file_of(msg: &DhcpMessage) -> Option<String> {
    msg.option(opt::BOOTFILE)
        .and_then(text)
        .or_else(|| text(&msg.file))
}

/// `siaddr`, else option 66 when it is an address.
fn next_server_of(msg: &DhcpMessage) -> Option<Ipv4Addr> {
    (!msg.siaddr.is_unspecified())
        .then_some(msg.siaddr)
        .or_else(|| {
            msg.option(opt::TFTP_SERVER)
                .and_then(text)
                .and_then(|s| s.parse().ok())
        })
}

/// The offer as a [`ProxyOffer`], if it is one: no address, option 60 `PXEClient`, a
/// server id.
fn proxy_offer_of(msg: &DhcpMessage) -> Option<ProxyOffer> {
    if !msg.yiaddr.is_unspecified() || !msg.vendor_class()?.starts_with("PXEClient") {
        return None;
    }
    Some(ProxyOffer {
        server: msg.server_id()?,
        pxe: msg
            .option(opt::VENDOR_SPECIFIC)
            .and_then(|v| PxeOptions::decode(v).ok()),
        file: boot_file_of(msg),
        next_server: next_server_of(msg),
    })
}

impl DhcpClient {
    /// A client about to DISCOVER with transaction id `xid` (pick it at random per client).
    /// The first DISCOVER is ready in [`poll_transmit`](Self::poll_transmit) at once.
    pub fn new(config: ClientConfig, xid: u32, now: Instant) -> DhcpClient {
        let mut c = DhcpClient {
            timeout: config.initial_timeout,
            config,
            xid,
            state: ClientState::Selecting,
            started: now,
            attempts: 0,
            deadline: None,
            pending: None,
            rng: u64::from(xid) | 1 << 40,
            stats: ClientStats::default(),
            events: Vec::new(),
            proxy: None,
            lease: None,
            phase: RenewalPhase::Bound,
            declining: None,
        };
        c.begin(now);
        c
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn mac(&self) -> MacAddr {
        self.config.mac
    }

    /// The current transaction id (it changes when the client starts over).
    pub fn xid(&self) -> u32 {
        self.xid
    }

    pub fn state(&self) -> &ClientState {
        &self.state
    }

    pub fn binding(&self) -> Option<&Binding> {
        match &self.state {
            ClientState::Bound(b) => Some(b),
            _ => None,
        }
    }

    /// The first ProxyDHCP offer heard (also on the [`Binding`] once bound).
    pub fn proxy_offer(&self) -> Option<&ProxyOffer> {
        self.proxy.as_ref()
    }

    /// The timers of a kept lease ([`ClientConfig::renew`]); `None` unless bound with a
    /// lease time.
    pub fn lease_times(&self) -> Option<LeaseTimes> {
        self.lease.filter(|_| self.is_bound())
    }

    /// Where a kept lease is: before T1, renewing or rebinding.
    pub fn renewal_phase(&self) -> RenewalPhase {
        self.phase
    }

    pub fn is_bound(&self) -> bool {
        matches!(self.state, ClientState::Bound(_))
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.state, ClientState::Failed(_))
    }

    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to be called; `None` once
    /// released or failed, and once bound unless the lease is kept
    /// ([`ClientConfig::renew`]: then T1, T2, the retries between them and the expiry).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// A new round: new DISCOVER, fresh timers. The xid is kept for the first round.
    fn begin(&mut self, now: Instant) {
        self.state = ClientState::Selecting;
        self.started = now;
        self.attempts = 0;
        self.timeout = self.config.initial_timeout;
        self.pending = Some(MessageType::Discover);
        self.deadline = None;
    }

    fn restart(&mut self, now: Instant, why: String) {
        self.stats.restarts += 1;
        if self.stats.restarts > self.config.max_restarts {
            self.fail(ClientError::TooManyRestarts {
                restarts: self.stats.restarts - 1,
                last: why,
            });
            return;
        }
        // A new transaction, so late replies to the old one are not taken for this one.
        self.xid = self.xid.wrapping_add(0x9e37_79b9);
        self.begin(now);
    }

    fn fail(&mut self, e: ClientError) {
        self.events.push(ClientEvent::Failed(e.clone()));
        self.state = ClientState::Failed(e);
        self.deadline = None;
        self.pending = None;
        self.lease = None;
    }

    /// Up to a quarter of `d` more, from a xorshift seeded by the xid.
    fn jittered(&mut self, d: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let quarter = d.as_micros() as u64 / 4;
        d + Duration::from_micros(if quarter == 0 { 0 } else { self.rng % quarter })
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if now >= d => {}
            _ => return,
        }
        self.deadline = None;
        match self.state.clone() {
            ClientState::Selecting => {
                if self.attempts >= self.config.discover_attempts {
                    return self.fail(ClientError::NoOffer {
                        attempts: self.attempts,
                    });
                }
                self.stats.retransmits += 1;
                self.pending = Some(MessageType::Discover);
            }
            ClientState::Requesting { .. } => {
                if self.attempts >= self.config.request_attempts {
                    self.events.push(ClientEvent::RequestTimedOut);
                    return self
                        .restart(now, format!("no answer to {} DHCPREQUESTs", self.attempts));
                }
                self.stats.retransmits += 1;
                self.pending = Some(MessageType::Request);
            }
            ClientState::Bound(b) => return self.renewal_timeout(now, b.ip),
            _ => {}
        }
        self.timeout = (self.timeout * 2).min(self.config.max_timeout);
    }

    /// T1, T2, a renewal retry or the expiry of a kept lease.
    fn renewal_timeout(&mut self, now: Instant, ip: Ipv4Addr) {
        let Some(l) = self.lease else { return };
        let phase = if now >= l.expires_at {
            return self.fail(ClientError::LeaseLost {
                ip,
                why: "the lease expired without a renewal".into(),
            });
        } else if now >= l.rebind_at {
            RenewalPhase::Rebinding
        } else if now >= l.renew_at {
            RenewalPhase::Renewing
        } else {
            self.deadline = Some(l.renew_at);
            return;
        };
        if phase != self.phase {
            // A new exchange: a new xid, and `secs` counts from here.
            self.xid = self.xid.wrapping_add(0x9e37_79b9);
            self.started = now;
            self.phase = phase;
        } else {
            self.stats.retransmits += 1;
        }
        self.pending = Some(MessageType::Request);
    }

    /// Gives up an address the caller found in use by another host after the ACK (an ARP
    /// probe answered): queues a DECLINE to the server (RFC 2131 §4.4.1) and holds
    /// nothing any more. Does nothing unless bound.
    pub fn decline(&mut self) {
        if let ClientState::Bound(b) = &self.state {
            self.declining = Some((b.ip, b.server_id));
            self.events
                .push(ClientEvent::Failed(ClientError::Declined { ip: b.ip }));
            self.state = ClientState::Declined;
            self.pending = Some(MessageType::Decline);
            self.deadline = None;
            self.lease = None;
        }
    }

    /// A datagram received on port 68 (from anyone: a broadcast reply reaches every
    /// client of a host). What is not for this client, or not usable now, is counted in
    /// [`ClientStats`] and dropped.
    pub fn handle(&mut self, now: Instant, _from: SocketAddr, bytes: &[u8]) {
        let _ = match DhcpMessage::parse(bytes) {
            Ok(msg) => self.handle_message(now, &msg),
            Err(e) => {
                self.stats.not_ours += 1;
                Err(Ignored::Malformed(e.to_string()))
            }
        };
    }

    /// Handles a parsed reply (for a caller that parses once to route replies to its
    /// clients by `xid` or `chaddr`); says why it was not used.
    ///
    /// A ProxyDHCP offer is still answered with [`Ignored::Unexpected`] — it does not move
    /// the exchange on — but the first one is remembered ([`proxy_offer`](Self::proxy_offer)).
    pub fn handle_message(&mut self, now: Instant, msg: &DhcpMessage) -> Result<(), Ignored> {
        if msg.op != BOOTREPLY {
            self.stats.not_ours += 1;
            return Err(Ignored::NotAReply);
        }
        if msg.xid != self.xid || msg.hlen != 6 || msg.mac() != self.config.mac {
            self.stats.not_ours += 1;
            return Err(Ignored::NotOurs);
        }
        if msg.message_type() == Some(MessageType::Offer) {
            self.remember_proxy(msg);
        }
        match (msg.message_type(), self.state.clone()) {
            (Some(MessageType::Offer), ClientState::Selecting) => {
                self.stats.offers += 1;
                let Some(server_id) = msg.server_id() else {
                    return self.ignore("OFFER without a server identifier");
                };
                if msg.yiaddr.is_unspecified() {
                    // A ProxyDHCP offer: boot information, no address. Not what we wait for
                    // (remembered above when it is PXE's).
                    return self.ignore("OFFER without an address (ProxyDHCP)");
                }
                let ip = msg.yiaddr;
                self.events.push(ClientEvent::Offered { ip, server_id });
                self.state = ClientState::Requesting {
                    offered: ip,
                    server_id,
                };
                self.attempts = 0;
                self.timeout = self.config.initial_timeout;
                self.pending = Some(MessageType::Request);
                self.deadline = None;
                Ok(())
            }
            (Some(MessageType::Offer), _) => {
                self.stats.offers += 1;
                self.ignore("OFFER after one was taken")
            }
            (Some(MessageType::Ack), ClientState::Requesting { offered, server_id }) => {
                if msg.server_id().is_some_and(|s| s != server_id) {
                    return self.ignore("ACK from another server");
                }
                if msg.yiaddr != offered {
                    return self.ignore("ACK for another address");
                }
                let binding = self.binding_from(msg, server_id);
                self.events.push(ClientEvent::Bound(binding.clone()));
                self.deadline = None;
                self.set_lease(now, msg, &binding);
                self.state = ClientState::Bound(binding);
                self.pending = None;
                Ok(())
            }
            (Some(MessageType::Nak), ClientState::Requesting { server_id, .. }) => {
                if msg.server_id().is_some_and(|s| s != server_id) {
                    return self.ignore("NAK from another server");
                }
                self.stats.naks += 1;
                let message = msg.option(opt::MESSAGE).and_then(text);
                let why = format!("DHCPNAK: {}", message.as_deref().unwrap_or("no reason"));
                self.events.push(ClientEvent::Nak { message });
                self.restart(now, why);
                Ok(())
            }
            (Some(MessageType::Ack), ClientState::Bound(b)) if self.phase != RenewalPhase::Bound => {
                if self.phase == RenewalPhase::Renewing
                    && msg.server_id().is_some_and(|s| s != b.server_id)
                {
                    return self.ignore("renewal ACK from another server");
                }
                if msg.yiaddr != b.ip {
                    return self.ignore("renewal ACK for another address");
                }
                let binding = Binding {
                    proxy: b.proxy.clone(),
                    ..self.binding_from(msg, b.server_id)
                };
                self.phase = RenewalPhase::Bound;
                self.timeout = self.config.initial_timeout;
                self.set_lease(now, msg, &binding);
                self.events.push(ClientEvent::Bound(binding.clone()));
                self.state = ClientState::Bound(binding);
                self.pending = None;
                Ok(())
            }
            (Some(MessageType::Nak), ClientState::Bound(b)) if self.phase != RenewalPhase::Bound => {
                if self.phase == RenewalPhase::Renewing
                    && msg.server_id().is_some_and(|s| s != b.server_id)
                {
                    return self.ignore("renewal NAK from another server");
                }
                self.stats.naks += 1;
                let message = msg.option(opt::MESSAGE).and_then(text);
                let why = format!(
                    "DHCPNAK while {}: {}",
                    if self.phase == RenewalPhase::Renewing { "renewing" } else { "rebinding" },
                    message.as_deref().unwrap_or("no reason")
                );
                self.events.push(ClientEvent::Nak { message });
                self.fail(ClientError::LeaseLost { ip: b.ip, why });
                Ok(())
            }
            _ => self.ignore("reply not expected in this state"),
        }
    }

    /// The timers of a kept lease, from the ACK's options 51, 58 and 59.
    fn set_lease(&mut self, now: Instant, msg: &DhcpMessage, binding: &Binding) {
        let secs = |code| {
            msg.option(code)
                .and_then(|v| Some(u32::from_be_bytes(v.try_into().ok()?)))
        };
        self.lease = binding
            .lease_time
            .filter(|&t| self.config.renew && t != u32::MAX)
            .map(|t| LeaseTimes::new(now, t, secs(opt::RENEWAL_TIME), secs(opt::REBINDING_TIME)));
        self.deadline = self.lease.map(|l| l.renew_at);
    }

    /// Keeps the first ProxyDHCP offer of a client that still wants boot information.
    fn remember_proxy(&mut self, msg: &DhcpMessage) {
        if self.proxy.is_some()
            || matches!(self.state, ClientState::Released | ClientState::Failed(_))
        {
            return;
        }
        let Some(p) = proxy_offer_of(msg) else { return };
        if let ClientState::Bound(b) = &mut self.state {
            b.proxy = Some(p.clone());
        }
        self.proxy = Some(p);
    }

    fn ignore(&mut self, why: &'static str) -> Result<(), Ignored> {
        self.stats.ignored += 1;
        Err(Ignored::Unexpected(why))
    }

    fn binding_from(&self, msg: &DhcpMessage, server_id: Ipv4Addr) -> Binding {
        Binding {
            ip: msg.yiaddr,
            server_id: msg.server_id().unwrap_or(server_id),
            prefix_len: msg
                .option(opt::SUBNET_MASK)
                .and_then(ip_of)
                .and_then(prefix_of)
                .unwrap_or(24),
            router: msg.option(opt::ROUTER).and_then(|v| ip_of(v.get(..4)?)),
            lease_time: msg
                .option(opt::LEASE_TIME)
                .and_then(|v| Some(u32::from_be_bytes(v.try_into().ok()?))),
            boot_file: boot_file_of(msg),
            next_server: next_server_of(msg),
            proxy: self.proxy.clone(),
        }
    }

    /// Gives the lease back: queues a RELEASE to the server (unicast, from the bound
    /// address) and forgets the binding. Does nothing unless bound.
    pub fn release(&mut self) {
        if self.is_bound() {
            self.pending = Some(MessageType::Release);
            self.lease = None;
        }
    }

    /// Appends the next datagram to send, if any, to `buf`; the [`Transmit`] names the
    /// bound address as its source when it must leave from there (RENEW, REBIND, RELEASE).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let t = self.poll_datagram(now)?;
        buf.extend_from_slice(&t.bytes);
        Some(Transmit::new(SocketAddr::V4(t.dest), t.bytes.len()).from_source(t.source.map(IpAddr::V4)))
    }

    /// The next datagram to send, if any, with its message type (for a caller that logs
    /// or routes by it); the same sequence [`poll_transmit`](Self::poll_transmit) gives.
    pub fn poll_datagram(&mut self, now: Instant) -> Option<ClientTransmit> {
        let mt = self.pending.take()?;
        let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, self.config.server_port);
        let mut msg = DhcpMessage {
            xid: self.xid,
            secs: now
                .saturating_duration_since(self.started)
                .as_secs()
                .min(u64::from(u16::MAX)) as u16,
            ..DhcpMessage::default()
        };
        msg.set_mac(self.config.mac);
        msg.set_option(opt::MESSAGE_TYPE, vec![mt as u8]);
        let broadcast_flag = if self.config.broadcast { FLAG_BROADCAST } else { 0 };
        let mut source = None;
        let dest = match (mt, self.state.clone()) {
            (MessageType::Discover, ClientState::Selecting) => {
                msg.flags = broadcast_flag;
                self.add_identity(&mut msg);
                self.stats.discovers += 1;
                broadcast
            }
            (MessageType::Request, ClientState::Requesting { offered, server_id }) => {
                msg.flags = broadcast_flag;
                self.add_identity(&mut msg);
                msg.set_option(opt::REQUESTED_IP, offered.octets().to_vec());
                msg.set_option(opt::SERVER_ID, server_id.octets().to_vec());
                self.stats.requests += 1;
                broadcast
            }
            (MessageType::Release, ClientState::Bound(b)) => {
                msg.ciaddr = b.ip;
                msg.set_option(opt::SERVER_ID, b.server_id.octets().to_vec());
                if !self.config.client_id.is_empty() {
                    msg.set_option(opt::CLIENT_ID, self.config.client_id.clone());
                }
                self.state = ClientState::Released;
                self.deadline = None;
                source = Some(b.ip);
                SocketAddrV4::new(b.server_id, self.config.server_port)
            }
            (MessageType::Request, ClientState::Bound(b)) if self.phase != RenewalPhase::Bound => {
                // RENEWING/REBINDING (RFC 2131 §4.3.2): ciaddr, no option 50 or 54; the
                // server answers to ciaddr, so no broadcast flag.
                msg.ciaddr = b.ip;
                self.add_identity(&mut msg);
                self.stats.requests += 1;
                source = Some(b.ip);
                if self.phase == RenewalPhase::Renewing {
                    SocketAddrV4::new(b.server_id, self.config.server_port)
                } else {
                    broadcast
                }
            }
            (MessageType::Decline, ClientState::Declined) => {
                let (ip, server_id) = self.declining.take()?;
                msg.set_option(opt::REQUESTED_IP, ip.octets().to_vec());
                msg.set_option(opt::SERVER_ID, server_id.octets().to_vec());
                if !self.config.client_id.is_empty() {
                    msg.set_option(opt::CLIENT_ID, self.config.client_id.clone());
                }
                broadcast
            }
            _ => return None,
        };
        if let (MessageType::Request, ClientState::Bound(_), Some(l)) =
            (mt, &self.state, self.lease)
        {
            // Half the time to the next boundary, no sooner than `initial_timeout`.
            let boundary = if self.phase == RenewalPhase::Renewing {
                l.rebind_at
            } else {
                l.expires_at
            };
            let half = boundary.saturating_duration_since(now) / 2;
            self.deadline = Some((now + half.max(self.config.initial_timeout)).min(boundary));
        } else if matches!(mt, MessageType::Discover | MessageType::Request) {
            self.attempts += 1;
            let wait = self.jittered(self.timeout);
            self.deadline = Some(now + wait);
        }
        Some(ClientTransmit {
            dest,
            source,
            message_type: mt,
            bytes: msg.encode(),
        })
    }

    /// The options iPXE puts in every DISCOVER and REQUEST, in its order.
    fn add_identity(&self, msg: &mut DhcpMessage) {
        let c = &self.config;
        msg.set_option(
            opt::MAX_MESSAGE_SIZE,
            c.max_message_size.to_be_bytes().to_vec(),
        );
        if c.send_pxe_identity {
            msg.set_option(opt::CLIENT_ARCH, c.arch.to_be_bytes().to_vec());
            msg.set_option(opt::CLIENT_NII, vec![1, 2, 1]);
            msg.set_option(opt::VENDOR_CLASS, c.vendor_class.as_bytes().to_vec());
            if let Some(u) = &c.user_class {
                msg.set_option(opt::USER_CLASS, u.clone());
            }
        }
        msg.set_option(opt::PARAMETER_LIST, c.parameter_list.clone());
        if let (true, Some(e)) = (c.send_pxe_identity, &c.ipxe_encap) {
            msg.set_option(opt::IPXE_ENCAP, e.clone());
        }
        if !c.client_id.is_empty() {
            msg.set_option(opt::CLIENT_ID, c.client_id.clone());
        }
        if c.send_pxe_identity {
            let mut uuid = vec![0];
            uuid.extend_from_slice(&c.uuid);
            msg.set_option(opt::CLIENT_UUID, uuid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EngineConfig, Mode, Subnet};
    use crate::engine::{BootOffer, Engine, Event, LeaseChange};
    use crate::identify::identify;
    use fleetboot_boot::ClientIdentity;
    use std::collections::HashMap;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const T0_UNIX: u64 = 1_700_000_000;

    type TestEngine = Engine<fn(&ClientIdentity) -> Option<BootOffer>>;

    /// A datagram the client sent, as these tests look at it.
    struct Sent {
        dest: SocketAddrV4,
        source: Option<Ipv4Addr>,
        message_type: MessageType,
        bytes: Vec<u8>,
    }

    /// What a test asks of a client: its next datagram, and the reason it did not use one.
    trait Drive {
        fn poll(&mut self, now: Instant) -> Option<Sent>;
        fn take(&mut self, now: Instant, bytes: &[u8]) -> Result<(), Ignored>;
    }

    impl Drive for DhcpClient {
        fn poll(&mut self, now: Instant) -> Option<Sent> {
            let mut buf = b"earlier".to_vec();
            let t = self.poll_transmit(now, &mut buf)?;
            assert_eq!(&buf[..7], b"earlier", "poll_transmit appends");
            let bytes = buf[7..].to_vec();
            assert_eq!(bytes.len(), t.size);
            let SocketAddr::V4(dest) = t.destination else { panic!("{t:?}") };
            let source = t.source.map(|s| match s {
                IpAddr::V4(s) => s,
                IpAddr::V6(s) => panic!("{s}"),
            });
            let message_type = DhcpMessage::parse(&bytes).unwrap().message_type().unwrap();
            Some(Sent { dest, source, message_type, bytes })
        }

        fn take(&mut self, now: Instant, bytes: &[u8]) -> Result<(), Ignored> {
            match DhcpMessage::parse(bytes) {
                Ok(m) => self.handle_message(now, &m),
                Err(e) => Err(Ignored::Malformed(e.to_string())),
            }
        }
    }

    /// What the engine answered to one datagram, all lease changes taken as committed.
    struct Out {
        transmits: Vec<Sent>,
        lease_changes: Vec<LeaseChange>,
    }

    fn engine(range_hi: u8) -> TestEngine {
        Engine::new(EngineConfig {
            mode: Mode::Server,
            server_ip: SERVER,
            subnets: vec![Subnet {
                network: Ipv4Addr::new(10, 77, 0, 0),
                prefix_len: 24,
                range_start: Ipv4Addr::new(10, 77, 0, 10),
                range_end: Ipv4Addr::new(10, 77, 0, range_hi),
                router: Some(SERVER),
                dns: vec![],
                domain: None,
                lease_time: 3600,
            }],
            ..EngineConfig::default()
        }, advisor as fn(&ClientIdentity) -> Option<BootOffer>)
        .unwrap()
    }

    fn advisor(id: &ClientIdentity) -> Option<BootOffer> {
        id.is_ipxe.then(|| BootOffer {
            file: format!("http://10.77.0.1:8080/boot/{}.ipxe", id.mac.hyphenated()),
            next_server: SERVER,
        })
    }

    fn mac(i: u32) -> MacAddr {
        let b = i.to_be_bytes();
        MacAddr([0x02, 0xfb, b[0], b[1], b[2], b[3]])
    }

    fn client(i: u32, t0: Instant) -> DhcpClient {
        DhcpClient::new(
            ClientConfig::ipxe(mac(i), [i as u8; 16]),
            0x1000_0000 + i * 7919,
            t0,
        )
    }

    /// Simulated time: `Instant` for the clients, unix seconds for the engine.
    struct Clock {
        t0: Instant,
        now: Instant,
    }

    impl Clock {
        fn unix(&self) -> u64 {
            T0_UNIX + (self.now - self.t0).as_secs()
        }
    }

    fn to_engine(e: &mut TestEngine, clock: &Clock, bytes: &[u8]) -> Out {
        to_engine_as(e, clock, Ipv4Addr::UNSPECIFIED, bytes)
    }

    /// Delivers `bytes` to the engine as sent from `source` (a renewal comes from ciaddr).
    fn to_engine_as(e: &mut TestEngine, clock: &Clock, source: Ipv4Addr, bytes: &[u8]) -> Out {
        e.handle(clock.now, clock.unix(), SocketAddr::from((source, 68)), bytes);
        let mut lease_changes = Vec::new();
        while let Some(ev) = e.poll_event() {
            if let Event::Persist { ticket, changes } = ev {
                lease_changes.extend(changes);
                e.committed(ticket);
            }
        }
        let mut transmits = Vec::new();
        let mut buf = Vec::new();
        while let Some(x) = e.poll_transmit(clock.now, &mut buf) {
            let bytes = buf.split_off(buf.len() - x.size);
            let SocketAddr::V4(dest) = x.destination else { panic!() };
            let message_type = DhcpMessage::parse(&bytes).unwrap().message_type().unwrap();
            transmits.push(Sent { dest, source: None, message_type, bytes });
        }
        Out { transmits, lease_changes }
    }

    #[test]
    fn discover_looks_like_ipxe() {
        let t0 = Instant::now();
        let mut c = client(1, t0);
        let t = c.poll(t0).unwrap();
        assert_eq!(t.message_type, MessageType::Discover);
        assert_eq!(t.dest, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67));
        assert!(c.poll(t0).is_none());
        let m = DhcpMessage::parse(&t.bytes).unwrap();
        assert_eq!(m.op, 1);
        assert!(m.broadcast_flag());
        assert_eq!(m.mac(), mac(1));
        assert_eq!(m.vendor_class().as_deref(), Some(IPXE_VENDOR_CLASS));
        assert_eq!(m.client_arch(), Some(0));
        assert_eq!(m.option(opt::CLIENT_NII), Some(&[1, 2, 1][..]));
        assert_eq!(m.client_uuid(), Some([1; 16]));
        assert_eq!(m.user_classes(), ["iPXE"]);
        assert!(m.has_ipxe_encap());
        assert_eq!(m.client_id(), Some(&[1, 2, 0xfb, 0, 0, 0, 1][..]));
        assert_eq!(m.max_message_size(), Some(1472));
        assert_eq!(m.parameter_list(), IPXE_PARAMETER_LIST);
        let id = identify(&m);
        assert!(id.is_pxe && id.is_ipxe);
    }

    #[test]
    fn dora_against_the_engine() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = client(7, t0);
        let discover = c.poll(t0).unwrap();
        let offer = to_engine(&mut e, &clock, &discover.bytes);
        assert_eq!(offer.transmits.len(), 1);
        c.take(t0, &offer.transmits[0].bytes).unwrap();
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Offered {
                ip: Ipv4Addr::new(10, 77, 0, 10),
                server_id: SERVER
            })
        );
        // A second copy of the offer is ignored, not taken twice.
        assert_eq!(
            c.take(t0, &offer.transmits[0].bytes),
            Err(Ignored::Unexpected("OFFER after one was taken"))
        );
        let request = c.poll(t0).unwrap();
        assert_eq!(request.message_type, MessageType::Request);
        let m = DhcpMessage::parse(&request.bytes).unwrap();
        assert_eq!(m.requested_ip(), Some(Ipv4Addr::new(10, 77, 0, 10)));
        assert_eq!(m.server_id(), Some(SERVER));
        assert_eq!(m.xid, DhcpMessage::parse(&discover.bytes).unwrap().xid);
        let ack = to_engine(&mut e, &clock, &request.bytes);
        assert!(matches!(ack.lease_changes[..], [LeaseChange::Bound(_)]));
        c.take(t0, &ack.transmits[0].bytes).unwrap();
        let b = c.binding().unwrap().clone();
        assert_eq!(c.poll_event(), Some(ClientEvent::Bound(b.clone())));
        assert_eq!(
            b,
            Binding {
                ip: Ipv4Addr::new(10, 77, 0, 10),
                server_id: SERVER,
                prefix_len: 24,
                router: Some(SERVER),
                lease_time: Some(3600),
                boot_file: Some("http://10.77.0.1:8080/boot/02-fb-00-00-00-07.ipxe".into()),
                next_server: Some(SERVER),
                proxy: None,
            }
        );
        assert_eq!(c.poll_timeout(), None);
        assert_eq!(c.stats().retransmits, 0);

        c.release();
        let rel = c.poll(t0).unwrap();
        assert_eq!(rel.message_type, MessageType::Release);
        assert_eq!(rel.dest, SocketAddrV4::new(SERVER, 67));
        let out = to_engine(&mut e, &clock, &rel.bytes);
        assert_eq!(
            out.lease_changes,
            [LeaseChange::Removed(Ipv4Addr::new(10, 77, 0, 10))]
        );
        assert_eq!(c.state(), &ClientState::Released);
    }

    #[test]
    fn replies_for_others_are_not_taken() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let (mut a, mut b) = (client(1, t0), client(2, t0));
        let da = a.poll(t0).unwrap();
        let offer_a = to_engine(&mut e, &clock, &da.bytes);
        assert_eq!(
            b.take(t0, &offer_a.transmits[0].bytes),
            Err(Ignored::NotOurs)
        );
        assert_eq!(b.take(t0, &da.bytes), Err(Ignored::NotAReply));
        assert!(matches!(
            b.take(t0, &[1, 2, 3]),
            Err(Ignored::Malformed(_))
        ));
        assert_eq!(b.state(), &ClientState::Selecting);
        // A ProxyDHCP-style offer (no yiaddr) does not end selecting.
        let mut proxy = DhcpMessage::parse(&offer_a.transmits[0].bytes).unwrap();
        proxy.yiaddr = Ipv4Addr::UNSPECIFIED;
        assert!(a.handle_message(t0, &proxy).is_err());
        assert_eq!(a.state(), &ClientState::Selecting);
    }

    const PROXY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    fn proxy_engine() -> TestEngine {
        Engine::new(EngineConfig {
            mode: Mode::Proxy,
            server_ip: PROXY,
            ..EngineConfig::default()
        }, advisor as fn(&ClientIdentity) -> Option<BootOffer>)
        .unwrap()
    }

    #[test]
    fn proxy_offer_rides_on_the_binding() {
        // A DHCP server and a ProxyDHCP server both answer the DISCOVER; the proxy's offer
        // comes first. The address comes from the server; the proxy's boot servers are kept.
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let (mut dhcp, mut proxy) = (engine(200), proxy_engine());
        let mut c = client(5, t0);
        let d = c.poll(t0).unwrap();
        let p = to_engine(&mut proxy, &clock, &d.bytes);
        assert_eq!(p.transmits.len(), 1);
        assert_eq!(
            c.take(t0, &p.transmits[0].bytes),
            Err(Ignored::Unexpected("OFFER without an address (ProxyDHCP)"))
        );
        assert_eq!(c.state(), &ClientState::Selecting);
        let seen = c.proxy_offer().cloned().expect("proxy offer remembered");
        assert_eq!(seen.server, PROXY);
        let pxe = seen.pxe.as_ref().expect("option 43 decoded");
        assert_eq!(pxe.boot_servers[0].addrs, [PROXY]);
        assert_eq!(
            pxe.boot_menu[0].server_type,
            pxe.boot_servers[0].server_type
        );
        assert!(seen.file.as_deref().unwrap().ends_with(".ipxe"));

        let offer = to_engine(&mut dhcp, &clock, &d.bytes);
        c.take(t0, &offer.transmits[0].bytes).unwrap();
        let req = c.poll(t0).unwrap();
        // The REQUEST names the DHCP server, never the proxy.
        assert_eq!(
            DhcpMessage::parse(&req.bytes).unwrap().server_id(),
            Some(SERVER)
        );
        let ack = to_engine(&mut dhcp, &clock, &req.bytes);
        c.take(t0, &ack.transmits[0].bytes).unwrap();
        let b = c.binding().unwrap();
        assert_eq!((b.ip, b.server_id), (Ipv4Addr::new(10, 77, 0, 10), SERVER));
        assert_eq!(b.proxy.as_ref(), Some(&seen));
    }

    #[test]
    fn late_proxy_offers_are_kept_and_only_the_first() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut dhcp = engine(200);
        let mut c = client(6, t0);
        let d = c.poll(t0).unwrap();
        let offer = to_engine(&mut dhcp, &clock, &d.bytes);
        let proxied = to_engine(&mut proxy_engine(), &clock, &d.bytes);
        let proxy_msg = DhcpMessage::parse(&proxied.transmits[0].bytes).unwrap();

        // Not a proxy offer: no option 60 PXEClient, or no server id.
        let mut plain = proxy_msg.clone();
        plain.set_option(opt::VENDOR_CLASS, b"MSFT 5.0".to_vec());
        let mut anonymous = proxy_msg.clone();
        anonymous
            .options
            .retain(|(code, _)| *code != opt::SERVER_ID);
        // Malformed option 43: kept, without PXE options.
        let mut garbled = proxy_msg.clone();
        garbled.set_option(opt::VENDOR_SPECIFIC, vec![8, 200, 1]);
        // Another proxy, heard after the first.
        let mut second = proxy_msg.clone();
        second.set_option(opt::SERVER_ID, vec![10, 77, 0, 3]);

        c.take(t0, &offer.transmits[0].bytes).unwrap();
        for m in [&plain, &anonymous] {
            assert!(c.handle_message(t0, m).is_err());
        }
        assert_eq!(c.proxy_offer(), None);
        // While requesting: kept.
        assert!(c.handle_message(t0, &garbled).is_err());
        let kept = c.proxy_offer().cloned().unwrap();
        assert_eq!((kept.server, kept.pxe), (PROXY, None));
        assert!(matches!(c.state(), ClientState::Requesting { .. }));
        let req = c.poll(t0).unwrap();
        let ack = to_engine(&mut dhcp, &clock, &req.bytes);
        assert!(c.handle_message(t0, &second).is_err());
        c.take(t0, &ack.transmits[0].bytes).unwrap();
        assert_eq!(c.binding().unwrap().proxy.as_ref().unwrap().server, PROXY);

        // Bound before any proxy offer: the binding gets it when it comes.
        let mut late = client(8, t0);
        let d = late.poll(t0).unwrap();
        let offer = to_engine(&mut dhcp, &clock, &d.bytes);
        let proxied = to_engine(&mut proxy_engine(), &clock, &d.bytes);
        late.take(t0, &offer.transmits[0].bytes).unwrap();
        let req = late.poll(t0).unwrap();
        let ack = to_engine(&mut dhcp, &clock, &req.bytes);
        late.take(t0, &ack.transmits[0].bytes).unwrap();
        assert_eq!(late.binding().unwrap().proxy, None);
        assert!(late.take(t0, &proxied.transmits[0].bytes).is_err());
        let b = late.binding().unwrap();
        assert_eq!(b.proxy.as_ref().map(|p| p.server), Some(PROXY));
        assert_eq!(late.proxy_offer(), b.proxy.as_ref());
        // Released: nothing more is taken.
        late.release();
        let _ = late.poll(t0);
        assert_eq!(late.state(), &ClientState::Released);
    }

    #[test]
    fn pxe_identity_is_not_ipxe() {
        let t0 = Instant::now();
        let mut c = DhcpClient::new(ClientConfig::pxe(mac(3), [3; 16]), 7, t0);
        let m = DhcpMessage::parse(&c.poll(t0).unwrap().bytes).unwrap();
        let id = identify(&m);
        assert!(id.is_pxe && !id.is_ipxe);
        assert_eq!(m.vendor_class().as_deref(), Some(IPXE_VENDOR_CLASS));
        assert_eq!(m.client_id(), Some(&[1, 2, 0xfb, 0, 0, 0, 3][..]));
        assert_eq!(m.max_message_size(), Some(1260));
        assert!(m.parameter_list().contains(&opt::VENDOR_SPECIFIC));
        assert!(!m.has_ipxe_encap() && m.user_classes().is_empty());
    }

    #[test]
    fn nak_restarts_with_a_new_transaction() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = client(3, t0);
        let d = c.poll(t0).unwrap();
        let offer = to_engine(&mut e, &clock, &d.bytes);
        c.take(t0, &offer.transmits[0].bytes).unwrap();
        let req = c.poll(t0).unwrap();
        let old_xid = c.xid();
        let mut nak = DhcpMessage::parse(&req.bytes).unwrap();
        nak.op = BOOTREPLY;
        nak.options = vec![
            (opt::MESSAGE_TYPE, vec![MessageType::Nak as u8]),
            (opt::SERVER_ID, SERVER.octets().to_vec()),
            (opt::MESSAGE, b"wrong network".to_vec()),
        ];
        c.handle_message(t0, &nak).unwrap();
        c.poll_event();
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Nak {
                message: Some("wrong network".into())
            })
        );
        assert_eq!(c.state(), &ClientState::Selecting);
        assert_ne!(c.xid(), old_xid);
        assert_eq!(c.stats().naks, 1);
        // The new round completes against the engine.
        let d = c.poll(t0).unwrap();
        assert_eq!(d.message_type, MessageType::Discover);
        let offer = to_engine(&mut e, &clock, &d.bytes);
        c.take(t0, &offer.transmits[0].bytes).unwrap();
        let req = c.poll(t0).unwrap();
        let ack = to_engine(&mut e, &clock, &req.bytes);
        c.take(t0, &ack.transmits[0].bytes).unwrap();
        assert!(c.is_bound());
    }

    #[test]
    fn backoff_doubles_then_gives_up() {
        let t0 = Instant::now();
        let mut cfg = ClientConfig::ipxe(mac(9), [0; 16]);
        cfg.discover_attempts = 5;
        cfg.max_timeout = Duration::from_secs(4);
        let mut c = DhcpClient::new(cfg, 42, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        while let Some(t) = c.poll(now) {
            assert_eq!(t.message_type, MessageType::Discover);
            let d = c.poll_timeout().unwrap();
            waits.push(d - now);
            // Early calls do nothing.
            c.handle_timeout(d - Duration::from_millis(1));
            assert!(c.poll(now).is_none());
            now = d;
            c.handle_timeout(now);
        }
        let base = [1, 2, 4, 4, 4];
        assert_eq!(waits.len(), 5);
        for (w, b) in waits.iter().zip(base) {
            let b = Duration::from_secs(b);
            assert!(*w >= b && *w < b + b / 4, "{w:?} vs {b:?}");
        }
        assert_eq!(
            c.state(),
            &ClientState::Failed(ClientError::NoOffer { attempts: 5 })
        );
        assert_eq!(c.stats().retransmits, 4);
        assert_eq!(c.poll_timeout(), None);
        assert!(c.poll(now).is_none());
    }

    #[test]
    fn unanswered_requests_restart_then_fail() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut cfg = ClientConfig::ipxe(mac(4), [0; 16]);
        cfg.request_attempts = 2;
        cfg.max_restarts = 1;
        let mut c = DhcpClient::new(cfg, 99, t0);
        let mut now = t0;
        let mut requests = 0;
        for _ in 0..50 {
            while let Some(t) = c.poll(now) {
                if t.message_type == MessageType::Discover {
                    // Offers arrive; every REQUEST is lost.
                    let out = to_engine(&mut e, &clock, &t.bytes);
                    c.take(now, &out.transmits[0].bytes).unwrap();
                } else {
                    requests += 1;
                }
            }
            let Some(d) = c.poll_timeout() else { break };
            now = d;
            c.handle_timeout(now);
        }
        assert_eq!(requests, 4);
        assert!(
            matches!(
                c.state(),
                ClientState::Failed(ClientError::TooManyRestarts { restarts: 1, .. })
            ),
            "{:?}",
            c.state()
        );
        assert_eq!(c.stats().restarts, 2);
    }

    /// A deterministic PRNG for the simulation (splitmix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn percent(&mut self, p: u64) -> bool {
            self.next() % 100 < p
        }
    }

    /// Many clients against one engine over a lossy link, simulated time. Returns the
    /// clients and the total retransmits.
    fn storm(n: u32, loss_percent: u64, seed: u64) -> (Vec<DhcpClient>, TestEngine, u32) {
        let t0 = Instant::now();
        let mut clock = Clock { t0, now: t0 };
        let mut e = engine(250);
        let mut rng = Rng(seed);
        let mut clients: Vec<DhcpClient> = (0..n).map(|i| client(i, t0)).collect();
        let by_mac: HashMap<MacAddr, usize> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.mac(), i))
            .collect();
        for _ in 0..10_000 {
            // Everything due now: client sends → (lossy) engine → (lossy) client.
            let mut progressed = true;
            while progressed {
                progressed = false;
                for i in 0..clients.len() {
                    while let Some(t) = clients[i].poll(clock.now) {
                        progressed = true;
                        if rng.percent(loss_percent) {
                            continue;
                        }
                        let out = to_engine(&mut e, &clock, &t.bytes);
                        for reply in out.transmits {
                            if rng.percent(loss_percent) {
                                continue;
                            }
                            let m = DhcpMessage::parse(&reply.bytes).unwrap();
                            // Broadcast: everyone hears it; only its owner takes it.
                            let owner = by_mac[&m.mac()];
                            for (j, c) in clients.iter_mut().enumerate() {
                                let r = c.handle_message(clock.now, &m);
                                if j != owner {
                                    assert_eq!(r, Err(Ignored::NotOurs));
                                }
                            }
                        }
                    }
                }
            }
            let Some(next) = clients.iter().filter_map(|c| c.poll_timeout()).min() else {
                break;
            };
            clock.now = next;
            for c in clients.iter_mut() {
                c.handle_timeout(clock.now);
            }
        }
        let retransmits = clients.iter().map(|c| c.stats().retransmits).sum();
        (clients, e, retransmits)
    }

    #[test]
    fn storm_without_loss_binds_everyone_without_retransmits() {
        let (clients, e, retransmits) = storm(200, 0, 1);
        assert!(clients.iter().all(|c| c.is_bound()));
        assert_eq!(retransmits, 0);
        assert_eq!(e.leases().iter().count(), 200);
    }

    #[test]
    fn storm_with_loss_binds_everyone_once() {
        for seed in 1..=5 {
            let (clients, e, retransmits) = storm(150, 20, seed);
            let mut ips = std::collections::HashSet::new();
            for c in &clients {
                let b = c.binding().unwrap_or_else(|| panic!("{:?}", c.state()));
                assert!(ips.insert(b.ip), "{} handed out twice", b.ip);
                // The engine agrees on who holds the address.
                assert_eq!(e.leases().get(b.ip).unwrap().mac, c.mac());
                assert_eq!(b.server_id, SERVER);
                assert_eq!(b.lease_time, Some(3600));
                assert!(b.boot_file.as_deref().unwrap().ends_with(".ipxe"));
            }
            assert!(retransmits > 0, "20% loss must cost retransmits");
            assert_eq!(
                clients.iter().map(|c| c.stats().retransmits).sum::<u32>(),
                retransmits
            );
        }
    }

    #[test]
    fn pool_exhaustion_fails_the_rest() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(10); // one address
        let (mut a, mut b) = (client(1, t0), client(2, t0));
        for c in [&mut a, &mut b] {
            let mut now = t0;
            loop {
                while let Some(t) = c.poll(now) {
                    for r in to_engine(&mut e, &clock, &t.bytes).transmits {
                        let _ = c.take(now, &r.bytes);
                    }
                }
                let Some(d) = c.poll_timeout() else { break };
                now = d;
                c.handle_timeout(now);
            }
        }
        assert!(a.is_bound());
        assert!(matches!(
            b.state(),
            ClientState::Failed(ClientError::NoOffer { attempts: 10 })
        ));
    }

    /// Binds a host client (renewals on) against the engine at `clock.now`.
    fn bound_host(e: &mut TestEngine, clock: &Clock, i: u32) -> DhcpClient {
        let mut c = DhcpClient::new(
            ClientConfig::host(mac(i), vec![0xff, 0, 0, 0, i as u8]),
            0x2000_0000 + i,
            clock.now,
        );
        let d = c.poll(clock.now).unwrap();
        let offer = to_engine(e, clock, &d.bytes);
        c.take(clock.now, &offer.transmits[0].bytes).unwrap();
        let req = c.poll(clock.now).unwrap();
        let ack = to_engine(e, clock, &req.bytes);
        c.take(clock.now, &ack.transmits[0].bytes).unwrap();
        assert!(c.is_bound());
        c
    }

    fn to_engine_from(e: &mut TestEngine, clock: &Clock, t: &Sent) -> Out {
        to_engine_as(e, clock, t.source.unwrap_or(Ipv4Addr::UNSPECIFIED), &t.bytes)
    }

    #[test]
    fn host_sends_no_pxe_identity() {
        let t0 = Instant::now();
        let mut cfg = ClientConfig::host(mac(1), vec![0xff, 1, 2, 3]);
        cfg.broadcast = false;
        let mut c = DhcpClient::new(cfg, 5, t0);
        let t = c.poll(t0).unwrap();
        let m = DhcpMessage::parse(&t.bytes).unwrap();
        assert_eq!(t.source, None);
        assert!(!m.broadcast_flag());
        assert_eq!(m.client_id(), Some(&[0xff, 1, 2, 3][..]));
        for code in [
            opt::VENDOR_CLASS,
            opt::CLIENT_ARCH,
            opt::CLIENT_NII,
            opt::CLIENT_UUID,
            opt::USER_CLASS,
            opt::IPXE_ENCAP,
        ] {
            assert!(!m.has_option(code), "option {code} sent by a plain host");
        }
        assert_eq!(m.parameter_list(), HOST_PARAMETER_LIST);
        let id = identify(&m);
        assert!(!id.is_pxe && !id.is_ipxe);
    }

    #[test]
    fn kept_lease_renews_at_t1_by_unicast_from_its_address() {
        let t0 = Instant::now();
        let mut clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = bound_host(&mut e, &clock, 1);
        let ip = c.binding().unwrap().ip;
        let l = c.lease_times().unwrap();
        assert_eq!(l.renew_at - t0, Duration::from_secs(1800));
        assert_eq!(l.rebind_at - t0, Duration::from_millis(3_150_000));
        assert_eq!(l.expires_at - t0, Duration::from_secs(3600));
        assert_eq!(c.poll_timeout(), Some(l.renew_at));
        assert!(c.poll_event().is_some()); // Offered
        assert!(matches!(c.poll_event(), Some(ClientEvent::Bound(_))));
        // Nothing before T1.
        c.handle_timeout(l.renew_at - Duration::from_millis(1));
        assert!(c.poll(clock.now).is_none());
        clock.now = l.renew_at;
        c.handle_timeout(clock.now);
        assert_eq!(c.renewal_phase(), RenewalPhase::Renewing);
        let renew = c.poll(clock.now).unwrap();
        assert_eq!(renew.dest, SocketAddrV4::new(SERVER, 67));
        assert_eq!(renew.source, Some(ip));
        let m = DhcpMessage::parse(&renew.bytes).unwrap();
        assert_eq!((m.ciaddr, m.requested_ip(), m.server_id()), (ip, None, None));
        assert!(!m.broadcast_flag());
        let ack = to_engine_from(&mut e, &clock, &renew);
        assert_eq!(ack.transmits[0].dest, SocketAddrV4::new(ip, 68));
        c.take(clock.now, &ack.transmits[0].bytes).unwrap();
        assert!(matches!(c.poll_event(), Some(ClientEvent::Bound(b)) if b.ip == ip));
        assert_eq!(c.renewal_phase(), RenewalPhase::Bound);
        let l2 = c.lease_times().unwrap();
        assert_eq!(l2.bound_at, clock.now);
        assert_eq!(l2.expires_at - clock.now, Duration::from_secs(3600));
        assert_eq!(c.poll_timeout(), Some(l2.renew_at));
    }

    #[test]
    fn unanswered_renewals_rebind_then_lose_the_lease() {
        let t0 = Instant::now();
        let mut clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = bound_host(&mut e, &clock, 2);
        let ip = c.binding().unwrap().ip;
        let l = c.lease_times().unwrap();
        let (mut renews, mut rebinds) = (0, 0);
        let mut xids = std::collections::BTreeSet::new();
        while let Some(d) = c.poll_timeout() {
            clock.now = d;
            c.handle_timeout(d);
            while let Some(t) = c.poll(clock.now) {
                assert_eq!(t.source, Some(ip));
                xids.insert(DhcpMessage::parse(&t.bytes).unwrap().xid);
                if t.dest.ip().is_broadcast() {
                    assert!(clock.now >= l.rebind_at);
                    rebinds += 1;
                } else {
                    assert!(clock.now >= l.renew_at && clock.now < l.rebind_at);
                    renews += 1;
                }
            }
        }
        // Halving the time left: 1350 s, 675 s, ... down to 1 s, then the same from T2.
        assert!(renews >= 5 && rebinds >= 5, "{renews} renews, {rebinds} rebinds");
        assert_eq!(xids.len(), 2, "one xid per phase");
        assert_eq!(clock.now, l.expires_at);
        assert!(matches!(
            c.state(),
            ClientState::Failed(ClientError::LeaseLost { ip: lost, .. }) if *lost == ip
        ));
        assert_eq!(c.lease_times(), None);
    }

    #[test]
    fn rebinding_is_answered_and_a_nak_loses_the_lease() {
        let t0 = Instant::now();
        let mut clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = bound_host(&mut e, &clock, 3);
        let ip = c.binding().unwrap().ip;
        clock.now = c.lease_times().unwrap().rebind_at;
        c.handle_timeout(clock.now);
        let rebind = c.poll(clock.now).unwrap();
        assert!(rebind.dest.ip().is_broadcast());
        let ack = to_engine_from(&mut e, &clock, &rebind);
        c.take(clock.now, &ack.transmits[0].bytes).unwrap();
        assert!(c.is_bound());
        assert_eq!(c.renewal_phase(), RenewalPhase::Bound);

        // The server forgot the lease (another client got it): the renewal is NAKed.
        clock.now = c.lease_times().unwrap().renew_at;
        c.handle_timeout(clock.now);
        let renew = c.poll(clock.now).unwrap();
        let mut nak = DhcpMessage::parse(&renew.bytes).unwrap();
        nak.op = BOOTREPLY;
        nak.options = vec![
            (opt::MESSAGE_TYPE, vec![MessageType::Nak as u8]),
            (opt::SERVER_ID, SERVER.octets().to_vec()),
            (opt::MESSAGE, b"address taken".to_vec()),
        ];
        // A NAK from another server is not for a renewal to ours.
        let mut foreign = nak.clone();
        foreign.set_option(opt::SERVER_ID, vec![10, 77, 0, 9]);
        assert!(c.handle_message(clock.now, &foreign).is_err());
        assert!(c.is_bound());
        c.handle_message(clock.now, &nak).unwrap();
        match c.state() {
            ClientState::Failed(ClientError::LeaseLost { ip: lost, why }) => {
                assert_eq!(*lost, ip);
                assert!(why.contains("address taken") && why.contains("renewing"), "{why}");
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn decline_quarantines_the_address_at_the_server() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = bound_host(&mut e, &clock, 4);
        let ip = c.binding().unwrap().ip;
        c.decline();
        assert_eq!(c.state(), &ClientState::Declined);
        assert_eq!(c.poll_timeout(), None);
        let t = c.poll(t0).unwrap();
        assert_eq!(t.message_type, MessageType::Decline);
        assert_eq!((t.dest.ip(), t.source), (&Ipv4Addr::BROADCAST, None));
        let m = DhcpMessage::parse(&t.bytes).unwrap();
        assert_eq!((m.requested_ip(), m.server_id()), (Some(ip), Some(SERVER)));
        assert_eq!(m.ciaddr, Ipv4Addr::UNSPECIFIED);
        let out = to_engine(&mut e, &clock, &t.bytes);
        assert!(matches!(&out.lease_changes[..], [LeaseChange::Declined(l)] if l.ip == ip));
        // Nothing more is sent; a new client gets another address.
        assert!(c.poll(t0).is_none());
        let other = bound_host(&mut e, &clock, 5);
        assert_ne!(other.binding().unwrap().ip, ip);
    }

    #[test]
    fn release_leaves_from_the_bound_address() {
        let t0 = Instant::now();
        let clock = Clock { t0, now: t0 };
        let mut e = engine(200);
        let mut c = bound_host(&mut e, &clock, 6);
        let ip = c.binding().unwrap().ip;
        c.release();
        let t = c.poll(t0).unwrap();
        assert_eq!((t.message_type, t.source), (MessageType::Release, Some(ip)));
        let out = to_engine_from(&mut e, &clock, &t);
        assert!(matches!(&out.lease_changes[..], [LeaseChange::Removed(r)] if *r == ip));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn lease_times_fall_back_when_t1_t2_are_inconsistent() {
        let t0 = Instant::now();
        let l = LeaseTimes::new(t0, 100, Some(90), Some(50));
        assert_eq!(l.renew_at - t0, Duration::from_secs(50));
        assert_eq!(l.rebind_at - t0, Duration::from_millis(87_500));
        let l = LeaseTimes::new(t0, 100, Some(10), Some(20));
        assert_eq!((l.renew_at - t0, l.rebind_at - t0), (Duration::from_secs(10), Duration::from_secs(20)));
        let l = LeaseTimes::new(t0, 100, None, Some(200));
        assert_eq!(l.rebind_at - t0, Duration::from_millis(87_500));
    }

    #[test]
    fn mask_to_prefix() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 0, 0)), Some(16));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(prefix_of(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}

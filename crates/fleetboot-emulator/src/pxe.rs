//! A PXE ROM's second half, as fleetboot's negotiators expect it: boot server discovery on
//! UDP 4011, then the boot file over PXE MTFTP (the multicast scheme of PXE 2.1 §M5, the
//! sans-I/O [`MtftpClient`]).
//!
//! - [`plan_discovery`]: which boot servers to ask and for which boot server type, from the
//!   operator's list, the ProxyDHCP offer or the DHCP server.
//! - [`discover_and_fetch`] / [`discover_and_fetch_with`]: the blocking client. It runs on a
//!   thread of its own (std sockets, `poll(2)`): the namespace e2e tests call it from a
//!   thread that `setns()`-ed into a client namespace, the emulator from tokio's blocking
//!   pool.
//!
//! # Discovery
//!
//! A DHCPREQUEST (option 60 `PXEClient`, option 43 sub-option 71 = the boot server type) to
//! each boot server's port 4011 in turn, repeated every 500 ms for 2 s per server. The
//! answer is a DHCPACK with a boot file and option 43 sub-options 1-5 (group, client port,
//! server port, listen timeout, reopen delay). A DHCPACK without a file carrying
//! [`SUB_WAIT_MS`] is fleetboot's *wait packet*: the negotiator is clearing a multicast group
//! with its peers. The client counts it, asks that server again only after the period it
//! names, and stays with it (up to 10 s from its first REQUEST) rather than moving on — the
//! answer is on its way, and asking the next negotiator would start a second clearing.
//!
//! Unlike a full PXE ROM, the client does not first send the ProxyDHCP server a REQUEST on
//! 4011 for its ProxyDHCP ACK: the boot servers it needs are already in the ProxyDHCP
//! offer ([`plan_discovery`]), and a boot server answers the discovery REQUEST itself.
//!
//! # Transfer
//!
//! The group is listened on by a socket bound to the group address (so other groups on the
//! same port in this namespace stay out) with `IP_MULTICAST_ALL` off (so groups other
//! sockets of this host joined stay out too), joined on the client's address; RRQs and ACKs
//! go from a unicast socket. A transfer that brings no new block for 8 s (its file server
//! died after the negotiator answered) sends the client back to discovery, at the next boot
//! server, as a PXE ROM that fails and retries would. New means not held before, wherever
//! it falls: a client that joined late hears the tail first, and its contiguous count stays
//! 0 until the head comes.
//!
//! # Opened or joined late
//!
//! [`MtftpClient`] does not say whose transfer it received; the client watches it instead:
//! the first DATA block it heard, and whether it had sent an RRQ by then
//! ([`TransferStart::of`]). Clients answered together listen together and open together:
//! each of them counts as [`TransferStart::Opened`], though the file server made only the
//! first RRQ it read the master (its records say which).

use fleetboot_boot::MacAddr;
use fleetboot_dhcp::client::Binding;
use fleetboot_dhcp::codec::{opt, BOOTREPLY, BOOTREQUEST};
use fleetboot_dhcp::pxe::{BootItem, PxeOptions};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_tftp::mtftp::{ClientPhase, MtftpClient, MtftpClientConfig, BLOCK};
use serde::Serialize;
use sha2::{Digest, Sha256};
use fleetboot_net::{MulticastInterface, Outbox, Poller, UdpBuilder};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use fleetboot_dhcp::pxe::{wait_period, SUB_WAIT_MS};

/// Where boot servers listen (PXE 2.1 §2.2.5).
pub const BOOT_SERVER_PORT: u16 = 4011;

/// The boot server type asked for when neither the operator nor a ProxyDHCP offer names
/// one: the first vendor type, which `fleetboot negotiate` maps to its first boot file.
pub const DEFAULT_BOOT_TYPE: u16 = 0x8000;

/// Parses a boot server type: `0x8000`, or decimal.
pub fn parse_boot_type(s: &str) -> Result<u16, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?}: want a boot server type, 0..=65535 (e.g. 0x8000)"))
}

/// Where the boot servers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServersFrom {
    /// The operator's list (`--boot-server`).
    Given,
    /// The ProxyDHCP offer's option 43 sub-option 8, for the boot server type.
    ProxyBootServers,
    /// The ProxyDHCP offer's server id (a ProxyDHCP server answers on 4011 too).
    ProxyServer,
    /// No ProxyDHCP offer said anything: the DHCP ACK's next server and server id.
    DhcpServer,
}

/// Whom to ask, for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryPlan {
    /// In the order they are tried (round robin after a failure).
    pub servers: Vec<Ipv4Addr>,
    pub boot_type: u16,
    pub from: ServersFrom,
}

fn usable(a: &Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_broadcast() || a.is_multicast())
}

fn push_unique(v: &mut Vec<Ipv4Addr>, a: Ipv4Addr) {
    if usable(&a) && !v.contains(&a) {
        v.push(a);
    }
}

/// The boot server type and servers for a client bound as `binding`.
///
/// Type: `given_type`, else the ProxyDHCP offer's first menu item, else its first boot
/// server entry, else [`DEFAULT_BOOT_TYPE`]. Servers: `given` when not empty; else the
/// ProxyDHCP offer's boot servers of that type; else that offer's server id; else the ACK's
/// next server and server id.
pub fn plan_discovery(
    binding: &Binding,
    given: &[Ipv4Addr],
    given_type: Option<u16>,
) -> DiscoveryPlan {
    let proxy_pxe = binding.proxy.as_ref().and_then(|p| p.pxe.as_ref());
    let boot_type = given_type
        .or_else(|| proxy_pxe.and_then(|p| p.boot_menu.first().map(|m| m.server_type)))
        .or_else(|| proxy_pxe.and_then(|p| p.boot_servers.first().map(|s| s.server_type)))
        .unwrap_or(DEFAULT_BOOT_TYPE);
    let mut servers = Vec::new();
    given.iter().for_each(|a| push_unique(&mut servers, *a));
    if !servers.is_empty() {
        return DiscoveryPlan {
            servers,
            boot_type,
            from: ServersFrom::Given,
        };
    }
    if let Some(p) = proxy_pxe {
        p.boot_servers
            .iter()
            .filter(|s| s.server_type == boot_type)
            .flat_map(|s| &s.addrs)
            .for_each(|a| push_unique(&mut servers, *a));
        if !servers.is_empty() {
            return DiscoveryPlan {
                servers,
                boot_type,
                from: ServersFrom::ProxyBootServers,
            };
        }
    }
    if let Some(p) = &binding.proxy {
        push_unique(&mut servers, p.server);
        if !servers.is_empty() {
            return DiscoveryPlan {
                servers,
                boot_type,
                from: ServersFrom::ProxyServer,
            };
        }
    }
    if let Some(n) = binding.next_server {
        push_unique(&mut servers, n);
    }
    push_unique(&mut servers, binding.server_id);
    DiscoveryPlan {
        servers,
        boot_type,
        from: ServersFrom::DhcpServer,
    }
}

/// How this client came by the file's first block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStart {
    /// It sent an RRQ while nothing flowed, and the flow began at block 1: its RRQ opened
    /// the transfer (as far as a client can tell: another client's RRQ in the same instant
    /// looks the same).
    Opened,
    /// It heard block 1 of a transfer without having asked: another client opened it while
    /// this one listened, and it rode along from the start.
    Shared,
    /// The first block it heard was past block 1: a transfer was flowing when it joined. It
    /// kept what it heard and fetched the blocks it missed afterwards (re-opening, or from a
    /// later transfer).
    JoinedLate,
}

impl TransferStart {
    /// From the first DATA block heard and whether an RRQ had gone out before it.
    pub fn of(first_block: u16, rrq_before: bool) -> TransferStart {
        match (first_block, rrq_before) {
            (1, true) => TransferStart::Opened,
            (1, false) => TransferStart::Shared,
            _ => TransferStart::JoinedLate,
        }
    }
}

/// The client's patience. The defaults are what `fleetboot negotiate`'s clients are tested
/// with; the tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeTimers {
    /// How long one boot server gets before the next is asked.
    pub per_server: Duration,
    /// REQUESTs are repeated this often while no answer comes.
    pub resend: Duration,
    /// Wait packets keep the client with their server for at most this long.
    pub wait_cap: Duration,
    /// A transfer without progress for this long is abandoned (back to discovery).
    pub stall: Duration,
    /// RRQ repetition while nothing flows after opening.
    pub rrq_retry: Duration,
    /// UDP port of the boot servers (4011; tests on loopback use another).
    pub port: u16,
}

impl Default for PxeTimers {
    fn default() -> Self {
        PxeTimers {
            per_server: Duration::from_secs(2),
            resend: Duration::from_millis(500),
            wait_cap: Duration::from_secs(10),
            stall: Duration::from_secs(8),
            rrq_retry: Duration::from_secs(1),
            port: BOOT_SERVER_PORT,
        }
    }
}

/// One PXE client's discovery and download.
#[derive(Debug, Clone)]
pub struct PxeClientConfig {
    /// The client's address: every socket is bound to it and the group is joined on it.
    pub me: Ipv4Addr,
    pub mac: MacAddr,
    /// Asked in turn; at least one.
    pub boot_servers: Vec<Ipv4Addr>,
    pub boot_type: u16,
    /// Option 97 in the REQUEST, when given.
    pub uuid: Option<[u8; 16]>,
    /// The REQUEST's transaction id.
    pub xid: u32,
    /// Give up after this long.
    pub limit: Duration,
    /// Return the file's bytes ([`PxeFetch::data`]), not only its length and hash.
    pub keep_data: bool,
    pub timers: PxeTimers,
    /// Set to stop early (checked at least every 250 ms): a run that ends does not wait
    /// for its clients' blocking threads to reach their limits.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl PxeClientConfig {
    /// Default timers, the data kept, xid from the MAC.
    pub fn new(
        me: Ipv4Addr,
        mac: MacAddr,
        boot_servers: &[Ipv4Addr],
        boot_type: u16,
        limit: Duration,
    ) -> PxeClientConfig {
        let m = mac.0;
        PxeClientConfig {
            me,
            mac,
            boot_servers: boot_servers.to_vec(),
            boot_type,
            uuid: None,
            xid: u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
            limit,
            keep_data: true,
            timers: PxeTimers::default(),
            cancel: None,
        }
    }
}

/// What one PXE client ended with. Durations count from the call's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeFetch {
    /// The boot server (negotiator) whose answer led to the file.
    pub boot_server: Ipv4Addr,
    pub file: String,
    /// Multicast group and client port (sub-options 1 and 2).
    pub group: SocketAddrV4,
    /// `siaddr` and sub-option 3: where RRQs went.
    pub file_server: SocketAddrV4,
    pub len: u64,
    pub sha256: [u8; 32],
    /// The file, when [`PxeClientConfig::keep_data`].
    pub data: Option<Vec<u8>>,
    /// Wait packets received, from any boot server, over the whole call.
    pub waits: u32,
    /// Answers acted on: 1, plus one per stalled transfer that sent the client back.
    pub answers: u32,
    pub start: TransferStart,
    /// The first DATA block heard in the transfer that completed.
    pub first_block: u16,
    /// RRQs this client sent in that transfer (opening, and re-opening to fill gaps).
    pub rrqs: u32,
    /// DATA blocks heard more than once.
    pub duplicates: u64,
    /// The answer that led to the file arrived.
    pub answered_at: Duration,
    pub first_block_at: Duration,
    pub done_at: Duration,
}

/// Why a PXE client gave up, with what it had counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PxeError {
    pub reason: String,
    pub waits: u32,
    pub answers: u32,
}

/// What happens as it happens, for callers that report progress (the emulator's report of
/// a client stopped midway says where it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PxeEvent {
    /// A REQUEST went to this boot server for the first time in its turn.
    Asking(Ipv4Addr),
    Wait {
        from: Ipv4Addr,
        period: Duration,
    },
    /// A real answer; the client has joined the group and listens.
    Answered {
        from: Ipv4Addr,
        file: String,
        group: SocketAddrV4,
        file_server: SocketAddrV4,
    },
    FirstBlock {
        block: u16,
        rrq_before: bool,
    },
    /// The transfer made no progress; back to discovery.
    Stalled(String),
}

/// The boot server discovery REQUEST: what a PXE ROM sends to port 4011 (chaddr, ciaddr,
/// options 60, 93, 94, 57, 97 when a UUID is given, and 43 with the boot item).
pub fn discovery_request(
    me: Ipv4Addr,
    mac: MacAddr,
    xid: u32,
    boot_type: u16,
    uuid: Option<[u8; 16]>,
) -> DhcpMessage {
    let mut req = DhcpMessage {
        op: BOOTREQUEST,
        xid,
        ciaddr: me,
        ..DhcpMessage::default()
    };
    req.set_mac(mac);
    let pxe = PxeOptions {
        boot_item: Some(BootItem {
            server_type: boot_type,
            layer: 0,
        }),
        ..Default::default()
    };
    req.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
    req.set_option(opt::MAX_MESSAGE_SIZE, 1260u16.to_be_bytes().to_vec());
    req.set_option(
        opt::VENDOR_CLASS,
        fleetboot_dhcp::client::IPXE_VENDOR_CLASS
            .as_bytes()
            .to_vec(),
    );
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

/// The MTFTP parameters of a real answer. `Err` names the missing piece: a boot server
/// that answers without them is not one this client can use.
fn mtftp_params(ack: &DhcpMessage) -> Result<(String, SocketAddrV4, MtftpClientConfig), String> {
    let p = PxeOptions::decode(ack.option(opt::VENDOR_SPECIFIC).ok_or("no option 43")?)
        .map_err(|e| format!("option 43: {e}"))?;
    let end = ack
        .file
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(ack.file.len());
    let file = String::from_utf8_lossy(&ack.file[..end]).into_owned();
    let group = SocketAddrV4::new(
        p.mtftp_ip.ok_or("no sub-option 1 (MTFTP group)")?,
        p.mtftp_client_port
            .ok_or("no sub-option 2 (MTFTP client port)")?,
    );
    if !group.ip().is_multicast() {
        return Err(format!(
            "sub-option 1: {} is not a multicast group",
            group.ip()
        ));
    }
    let server = SocketAddrV4::new(
        ack.siaddr,
        p.mtftp_server_port
            .ok_or("no sub-option 3 (MTFTP server port)")?,
    );
    if !usable(server.ip()) {
        return Err(format!("siaddr {} is no file server", server.ip()));
    }
    let secs = |v: u8| Duration::from_secs(u64::from(v));
    let cfg = MtftpClientConfig {
        file: file.clone(),
        server,
        listen_timeout: secs(p.mtftp_timeout.ok_or("no sub-option 4 (MTFTP timeout)")?),
        delay: secs(p.mtftp_delay.ok_or("no sub-option 5 (MTFTP delay)")?),
        rrq_retry: Duration::from_secs(1),
    };
    Ok((file, group, cfg))
}

/// The group socket: bound to the group address and client port (so no other group's
/// traffic on that port reaches it), joined on `me`, `IP_MULTICAST_ALL` off (the builder's
/// default), shared with the other clients of this host.
fn group_socket(group: SocketAddrV4, me: Ipv4Addr) -> Result<UdpSocket, String> {
    UdpBuilder::new(SocketAddr::V4(group))
        .reuse_address(true)
        .join(IpAddr::V4(*group.ip()), MulticastInterface::Address(me))
        .nonblocking(true)
        .purpose("MTFTP group")
        .bind()
        .map_err(|e| e.to_string())
}

/// Sends what the MTFTP client queued (RRQs to the server port, ACKs to the transfer's
/// port). UDP is best effort: a refused datagram is as good as lost, and the client's
/// timers repeat what matters.
fn flush(c: &mut MtftpClient, out: &mut Outbox, sock: &UdpSocket) {
    while let Some(t) = c.poll_transmit(Instant::now(), out.buffer()) {
        out.push(t);
    }
    let _ = out.send(sock);
    out.clear();
}

/// [`discover_and_fetch_with`] with default timers, the data kept and no cancellation.
pub fn discover_and_fetch(
    me: Ipv4Addr,
    mac: MacAddr,
    boot_servers: &[Ipv4Addr],
    boot_type: u16,
    limit: Duration,
) -> Result<PxeFetch, PxeError> {
    let cfg = PxeClientConfig::new(me, mac, boot_servers, boot_type, limit);
    discover_and_fetch_with(&cfg, |_| {})
}

struct Run<'a> {
    cfg: &'a PxeClientConfig,
    start: Instant,
    waits: u32,
    answers: u32,
}

impl Run<'_> {
    fn fail(&self, reason: String) -> PxeError {
        PxeError {
            reason,
            waits: self.waits,
            answers: self.answers,
        }
    }

    fn over(&self) -> Option<String> {
        if self
            .cfg
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Some("cancelled".into());
        }
        (self.start.elapsed() > self.cfg.limit)
            .then(|| format!("no file within {:?}", self.cfg.limit))
    }
}

/// Boot server discovery, then the PXE MTFTP download; see the module documentation.
/// Blocks until the file is complete, `limit` passes or `cancel` is set. `observe` sees
/// each [`PxeEvent`] on this thread.
pub fn discover_and_fetch_with(
    cfg: &PxeClientConfig,
    mut observe: impl FnMut(PxeEvent),
) -> Result<PxeFetch, PxeError> {
    let mut run = Run {
        cfg,
        start: Instant::now(),
        waits: 0,
        answers: 0,
    };
    if cfg.boot_servers.is_empty() {
        return Err(run.fail("no boot server to ask".into()));
    }
    let t = &cfg.timers;
    let sock = UdpSocket::bind(SocketAddrV4::new(cfg.me, 0))
        .map_err(|e| run.fail(format!("bind {}: {e}", cfg.me)))?;
    let request = discovery_request(cfg.me, cfg.mac, cfg.xid, cfg.boot_type, cfg.uuid).encode();
    let mut buf = vec![0u8; 65536];
    let mut k = 0usize;
    let mut last_err = String::new();
    loop {
        // Discovery: until a real answer.
        let (ack, from) = 'ask: loop {
            if let Some(why) = run.over() {
                let why = match last_err.is_empty() {
                    true => format!("{why}: no boot server answered"),
                    false => format!("{why}; last: {last_err}"),
                };
                return Err(run.fail(why));
            }
            let server = cfg.boot_servers[k % cfg.boot_servers.len()];
            k += 1;
            observe(PxeEvent::Asking(server));
            let asked = Instant::now();
            let mut until = asked + t.per_server;
            let mut next_send = asked;
            loop {
                let now = Instant::now();
                if now >= until || run.over().is_some() {
                    break;
                }
                if now >= next_send {
                    // A lost or refused REQUEST is repeated on schedule like an unanswered one.
                    let _ = sock.send_to(&request, SocketAddrV4::new(server, t.port));
                    next_send = now + t.resend;
                }
                let wait = next_send
                    .min(until)
                    .saturating_duration_since(Instant::now());
                let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(250));
                // Cannot fail for a non-zero duration.
                let _ = sock.set_read_timeout(Some(wait));
                let Ok((len, SocketAddr::V4(src))) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(m) = DhcpMessage::parse(&buf[..len]) else {
                    continue;
                };
                if m.op != BOOTREPLY
                    || m.xid != cfg.xid
                    || m.mac() != cfg.mac
                    || m.message_type() != Some(MessageType::Ack)
                {
                    continue;
                }
                if let Some(w) = wait_period(&m) {
                    run.waits += 1;
                    observe(PxeEvent::Wait {
                        from: *src.ip(),
                        period: w,
                    });
                    next_send = Instant::now() + w;
                    until = until.max(next_send + t.resend).min(asked + t.wait_cap);
                    continue;
                }
                break 'ask (m, *src.ip());
            }
        };
        run.answers += 1;
        let answered_at = run.start.elapsed();
        let (file, group, mcfg) =
            mtftp_params(&ack).map_err(|e| run.fail(format!("answer from {from}: {e}")))?;
        let file_server = mcfg.server;
        let gs = group_socket(group, cfg.me).map_err(|e| run.fail(e))?;
        let us = UdpBuilder::new(SocketAddr::V4(SocketAddrV4::new(cfg.me, 0)))
            .nonblocking(true)
            .purpose("MTFTP requests")
            .bind()
            .map_err(|e| run.fail(e.to_string()))?;
        let mut poller = Poller::new();
        poller.add(&gs);
        poller.add(&us);
        let mut out = Outbox::new(16);
        // After the join: whoever sees this may rely on the client hearing the group.
        observe(PxeEvent::Answered {
            from,
            file: file.clone(),
            group,
            file_server,
        });
        let mut c = MtftpClient::new(
            Instant::now(),
            MtftpClientConfig {
                rrq_retry: t.rrq_retry,
                ..mcfg
            },
        );
        let mut first: Option<(u16, bool, Duration)> = None;
        // Progress is a block not held before, wherever it falls: a client that joined late
        // hears the tail first and its contiguous count stays 0 until the head comes. (Also
        // cheap: `contiguous()` walks the blocks.)
        let mut heard = 0u64;
        let mut progress = (0u64, Instant::now());
        let stalled = loop {
            if c.phase() == ClientPhase::Done {
                break None;
            }
            if let Some(why) = run.over() {
                break Some(why);
            }
            let distinct = heard.saturating_sub(c.duplicates);
            if distinct != progress.0 {
                progress = (distinct, Instant::now());
            } else if progress.1.elapsed() > t.stall {
                break Some(format!("no new block for {:?}", t.stall));
            }
            flush(&mut c, &mut out, &us);
            let _ = poller.wait_for(Some(Duration::from_millis(50)));
            let now = Instant::now();
            for s in [&gs, &us] {
                while let Ok((len, SocketAddr::V4(src))) = s.recv_from(&mut buf) {
                    let bytes = &buf[..len];
                    // What MtftpClient takes as a block, seen before it takes it.
                    if let Some((block, data)) = fleetboot_tftp::codec::parse_data(bytes) {
                        if block != 0 && data.len() <= BLOCK {
                            heard += 1;
                            if first.is_none() {
                                let rrq_before = c.opens > 0;
                                first = Some((block, rrq_before, run.start.elapsed()));
                                observe(PxeEvent::FirstBlock { block, rrq_before });
                            }
                        }
                    }
                    c.handle(now, SocketAddr::V4(src), bytes);
                }
            }
            if c.poll_timeout().is_some_and(|d| d <= now) {
                c.handle_timeout(now);
            }
        };
        if let Some(why) = stalled {
            last_err = format!(
                "{file} from {file_server} on {group}: {why} (had {} blocks)",
                heard.saturating_sub(c.duplicates)
            );
            observe(PxeEvent::Stalled(last_err.clone()));
            continue;
        }
        // The last ACK tells the server its master is done.
        flush(&mut c, &mut out, &us);
        let data = c.file().unwrap_or_default();
        let (first_block, rrq_before, first_block_at) =
            first.unwrap_or((1, c.opens > 0, run.start.elapsed()));
        return Ok(PxeFetch {
            boot_server: from,
            file,
            group,
            file_server,
            len: data.len() as u64,
            sha256: Sha256::digest(&data).into(),
            data: cfg.keep_data.then_some(data),
            waits: run.waits,
            answers: run.answers,
            start: TransferStart::of(first_block, rrq_before),
            first_block,
            rrqs: c.opens,
            duplicates: c.duplicates,
            answered_at,
            first_block_at,
            done_at: run.start.elapsed(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetboot_dhcp::client::ProxyOffer;
    use fleetboot_dhcp::pxe::{BootServer, MenuItem};
    use fleetboot_tftp::mtftp::{MtftpServer, SenderConfig};
    use std::collections::HashMap;
    use std::sync::mpsc;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn binding(proxy: Option<ProxyOffer>) -> Binding {
        Binding {
            ip: ip("10.77.0.100"),
            server_id: ip("10.77.0.1"),
            prefix_len: 24,
            router: None,
            lease_time: Some(3600),
            boot_file: None,
            next_server: Some(ip("10.77.0.5")),
            proxy,
        }
    }

    fn proxy(pxe: Option<PxeOptions>) -> ProxyOffer {
        ProxyOffer {
            server: ip("10.77.0.2"),
            pxe,
            file: None,
            next_server: None,
        }
    }

    fn servers(list: &[(u16, &[&str])]) -> Vec<BootServer> {
        list.iter()
            .map(|(t, a)| BootServer {
                server_type: *t,
                addrs: a.iter().map(|s| ip(s)).collect(),
            })
            .collect()
    }

    #[test]
    fn boot_servers_come_from_the_flag_then_the_proxy_then_dhcp() {
        let menu = PxeOptions {
            boot_menu: vec![MenuItem {
                server_type: 0x8002,
                description: "arm".into(),
            }],
            boot_servers: servers(&[
                (0x8000, &["10.77.0.11"]),
                (
                    0x8002,
                    &["10.77.0.12", "0.0.0.0", "10.77.0.13", "10.77.0.12"],
                ),
                (0x8002, &["10.77.0.14"]),
            ]),
            ..Default::default()
        };
        let b = binding(Some(proxy(Some(menu.clone()))));
        // The menu's first item picks the type; its servers, in order, without repeats or
        // unusable addresses.
        let p = plan_discovery(&b, &[], None);
        assert_eq!(p.boot_type, 0x8002);
        assert_eq!(p.from, ServersFrom::ProxyBootServers);
        assert_eq!(
            p.servers,
            [ip("10.77.0.12"), ip("10.77.0.13"), ip("10.77.0.14")]
        );
        // The flag's type picks among the proxy's servers.
        let p = plan_discovery(&b, &[], Some(0x8000));
        assert_eq!(
            (p.boot_type, &p.servers[..]),
            (0x8000, &[ip("10.77.0.11")][..])
        );
        // A type the proxy lists no server for: the proxy itself.
        let p = plan_discovery(&b, &[], Some(0x8007));
        assert_eq!(p.from, ServersFrom::ProxyServer);
        assert_eq!(p.servers, [ip("10.77.0.2")]);
        // The flag's servers win, with the proxy's type.
        let given = [ip("10.77.0.21"), ip("255.255.255.255"), ip("10.77.0.22")];
        let p = plan_discovery(&b, &given, None);
        assert_eq!(p.from, ServersFrom::Given);
        assert_eq!(p.boot_type, 0x8002);
        assert_eq!(p.servers, [ip("10.77.0.21"), ip("10.77.0.22")]);
        // No menu: the first boot server entry's type.
        let no_menu = PxeOptions {
            boot_menu: vec![],
            ..menu
        };
        let p = plan_discovery(&binding(Some(proxy(Some(no_menu)))), &[], None);
        assert_eq!((p.boot_type, p.servers[0]), (0x8000, ip("10.77.0.11")));
        // A proxy offer without (readable) option 43: its server id, the default type.
        let p = plan_discovery(&binding(Some(proxy(None))), &[], None);
        assert_eq!(p.boot_type, DEFAULT_BOOT_TYPE);
        assert_eq!(
            (p.from, &p.servers[..]),
            (ServersFrom::ProxyServer, &[ip("10.77.0.2")][..])
        );
        // No proxy: the ACK's next server, then its server id.
        let p = plan_discovery(&binding(None), &[], None);
        assert_eq!(p.from, ServersFrom::DhcpServer);
        assert_eq!(p.servers, [ip("10.77.0.5"), ip("10.77.0.1")]);
        assert_eq!(p.boot_type, DEFAULT_BOOT_TYPE);
    }

    #[test]
    fn how_a_transfer_started() {
        assert_eq!(TransferStart::of(1, true), TransferStart::Opened);
        assert_eq!(TransferStart::of(1, false), TransferStart::Shared);
        assert_eq!(TransferStart::of(57, false), TransferStart::JoinedLate);
        // An RRQ that went out while another client's transfer flowed did not open it.
        assert_eq!(TransferStart::of(57, true), TransferStart::JoinedLate);
        assert_eq!(
            serde_json::to_value(TransferStart::JoinedLate).unwrap(),
            "joined_late"
        );
    }

    #[test]
    fn boot_types_parse_in_hex_or_decimal() {
        assert_eq!(parse_boot_type("0x8000"), Ok(0x8000));
        assert_eq!(parse_boot_type("0X8001"), Ok(0x8001));
        assert_eq!(parse_boot_type("32770"), Ok(0x8002));
        assert!(parse_boot_type("0x10000").is_err());
        assert!(parse_boot_type("pxe").is_err());
        assert!(parse_boot_type("").is_err());
    }

    fn ack_to(req: &DhcpMessage) -> DhcpMessage {
        let mut r = DhcpMessage {
            op: BOOTREPLY,
            xid: req.xid,
            chaddr: req.chaddr,
            hlen: 6,
            htype: 1,
            ..DhcpMessage::default()
        };
        r.set_option(opt::MESSAGE_TYPE, vec![MessageType::Ack as u8]);
        r.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
        r
    }

    fn wait_packet(req: &DhcpMessage, ms: u32) -> DhcpMessage {
        let mut r = ack_to(req);
        let pxe = PxeOptions {
            other: vec![(SUB_WAIT_MS, ms.to_be_bytes().to_vec())],
            ..Default::default()
        };
        r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        r
    }

    fn answer(
        req: &DhcpMessage,
        file: &str,
        group: SocketAddrV4,
        fs: SocketAddrV4,
        tmout: u8,
    ) -> DhcpMessage {
        let mut r = ack_to(req);
        r.siaddr = *fs.ip();
        r.file = file.as_bytes().to_vec();
        let pxe = PxeOptions {
            mtftp_ip: Some(*group.ip()),
            mtftp_client_port: Some(group.port()),
            mtftp_server_port: Some(fs.port()),
            mtftp_timeout: Some(tmout),
            mtftp_delay: Some(1),
            ..Default::default()
        };
        r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        r
    }

    #[test]
    fn the_request_and_the_answers_on_the_wire() {
        let mac = MacAddr([0x52, 0x54, 0, 0x60, 0, 7]);
        let req = discovery_request(ip("10.77.0.101"), mac, 77, 0x8003, Some([9; 16]));
        let parsed = DhcpMessage::parse(&req.encode()).unwrap();
        assert_eq!(parsed.message_type(), Some(MessageType::Request));
        assert_eq!(
            (parsed.mac(), parsed.xid, parsed.ciaddr),
            (mac, 77, ip("10.77.0.101"))
        );
        assert!(parsed.vendor_class().unwrap().starts_with("PXEClient"));
        assert_eq!(parsed.client_uuid(), Some([9; 16]));
        let pxe = PxeOptions::decode(parsed.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
        assert_eq!(pxe.boot_item.unwrap().server_type, 0x8003);

        let w = wait_packet(&req, 500);
        assert_eq!(wait_period(&w), Some(Duration::from_millis(500)));
        let group = SocketAddrV4::new(ip("239.255.1.1"), 1758);
        let fs = SocketAddrV4::new(ip("10.77.0.21"), 1759);
        let a = answer(&req, "bios/pxelinux.0", group, fs, 1);
        assert_eq!(wait_period(&a), None, "an answer is no wait packet");
        let (file, g, cfg) = mtftp_params(&a).unwrap();
        assert_eq!(
            (file.as_str(), g, cfg.server),
            ("bios/pxelinux.0", group, fs)
        );
        assert_eq!(cfg.listen_timeout, Duration::from_secs(1));
        // A malformed wait value is not a wait.
        let mut odd = w.clone();
        let pxe = PxeOptions {
            other: vec![(SUB_WAIT_MS, vec![1, 2])],
            ..Default::default()
        };
        odd.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        assert_eq!(wait_period(&odd), None);
        // Answers this client cannot use say why.
        let mut no_group = a.clone();
        no_group.set_option(opt::VENDOR_SPECIFIC, PxeOptions::default().encode());
        assert!(mtftp_params(&no_group)
            .unwrap_err()
            .contains("sub-option 1"));
        let unicast = answer(&req, "f", SocketAddrV4::new(ip("10.0.0.1"), 1), fs, 1);
        assert!(mtftp_params(&unicast).unwrap_err().contains("multicast"));
        let mut none = a.clone();
        none.options.retain(|(c, _)| *c != opt::VENDOR_SPECIFIC);
        assert!(mtftp_params(&none).is_err());
    }

    #[test]
    fn no_boot_servers_is_an_error_not_a_panic() {
        let e = discover_and_fetch(
            Ipv4Addr::LOCALHOST,
            MacAddr([2, 0, 0, 0, 0, 1]),
            &[],
            0x8000,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.reason.contains("no boot server"), "{e}");
    }

    /// Real sockets on loopback (multicast with TTL 0 on `lo`): a boot server that sends a
    /// wait packet, then an answer naming a file server that never sends, then a real one;
    /// a file server (the crate's `MtftpServer`) that pauses after block 10 until a second
    /// client has joined the group, then sends slowly. Client A: waited once, went back to
    /// discovery after the stall, opened the transfer. Client B: joined late at block 11,
    /// heard the tail for longer than the stall limit without a contiguous block (that is
    /// progress, not a stall), and fetched the head afterwards. Both files exact.
    #[test]
    fn wait_stall_open_and_late_join_on_loopback() {
        let lo = Ipv4Addr::LOCALHOST;
        let file: Vec<u8> = (0..120 * BLOCK + 100)
            .map(|i| (i * 31 + i / 509) as u8)
            .collect();
        // A port nobody uses right now, for the group.
        let port = UdpSocket::bind((lo, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let group = SocketAddrV4::new(
            Ipv4Addr::new(239, 255, 250, (std::process::id() % 200) as u8 + 1),
            port,
        );
        let stop = Arc::new(AtomicBool::new(false));

        // The file server: one socket for RRQs, ACKs and DATA to the group (TTL 0, looped).
        let fs_sock = UdpBuilder::new(SocketAddr::from((lo, 0)))
            .multicast_interface(MulticastInterface::Address(lo))
            .multicast_ttl(0)
            .multicast_loop(true)
            .bind()
            .unwrap();
        let fs = match fs_sock.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let dead = UdpSocket::bind((lo, 0)).unwrap();
        let dead_addr = match dead.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let (paused_tx, paused_rx) = mpsc::channel::<()>();
        let resume = Arc::new(AtomicBool::new(false));
        let fs_thread = {
            let (stop, resume, file) = (stop.clone(), resume.clone(), file.clone());
            std::thread::spawn(move || {
                let mut server =
                    MtftpServer::new("boot.0", file.len() as u64, group, SenderConfig::default()).unwrap();
                fs_sock
                    .set_read_timeout(Some(Duration::from_millis(5)))
                    .unwrap();
                let mut buf = vec![0u8; 2048];
                let mut out = Vec::new();
                let mut paused = false;
                while !stop.load(Ordering::Relaxed) {
                    if server.sender().blocks_sent >= 10 && !resume.load(Ordering::Relaxed) {
                        // Frozen: nothing read, nothing sent, no timers.
                        if !paused {
                            paused = true;
                            let _ = paused_tx.send(());
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let now = Instant::now();
                    if let Ok((n, from)) = fs_sock.recv_from(&mut buf) {
                        server.handle(now, from, &buf[..n]);
                    }
                    server.handle_timeout(now);
                    let mut src: &[u8] = &file;
                    while let Some(t) = server.poll_transmit(now, &mut src, &mut out) {
                        let _ = fs_sock.send_to(&out, t.destination);
                        out.clear();
                        if paused {
                            // ~110 blocks after the pause take ~2.2 s, longer than `stall`.
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                server.opened()
            })
        };

        // The boot server: per client, the answers in this order.
        let bs = UdpSocket::bind((lo, 0)).unwrap();
        let bs_port = bs.local_addr().unwrap().port();
        let mac_a = MacAddr([2, 0xfb, 0, 0, 0, 0xa]);
        let mac_b = MacAddr([2, 0xfb, 0, 0, 0, 0xb]);
        let bs_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                bs.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let mut asked: HashMap<MacAddr, usize> = HashMap::new();
                let mut buf = vec![0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = bs.recv_from(&mut buf) else {
                        continue;
                    };
                    let req = DhcpMessage::parse(&buf[..n]).unwrap();
                    let k = asked.entry(req.mac()).or_default();
                    *k += 1;
                    let reply = match (req.mac() == mac_a, *k) {
                        (true, 1) => wait_packet(&req, 100),
                        // The stall makes A ask again, two REQUESTs later at most.
                        (true, 2) => answer(&req, "boot.0", group, dead_addr, 0),
                        _ => answer(&req, "boot.0", group, fs, 1),
                    };
                    bs.send_to(&reply.encode(), from).unwrap();
                }
            })
        };

        let client = |mac: MacAddr| {
            let mut cfg = PxeClientConfig::new(lo, mac, &[lo], 0x8000, Duration::from_secs(60));
            cfg.timers = PxeTimers {
                stall: Duration::from_millis(1500),
                rrq_retry: Duration::from_millis(200),
                port: bs_port,
                ..PxeTimers::default()
            };
            cfg
        };
        let (events_a_tx, events_a) = mpsc::channel();
        let cfg_a = client(mac_a);
        let a = std::thread::spawn(move || {
            discover_and_fetch_with(&cfg_a, |e| {
                let _ = events_a_tx.send(e);
            })
        });
        // The file server froze after block 10 of A's transfer: start B, and let the flow
        // go on once B listens on the group.
        paused_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("A's transfer started");
        let (answered_b_tx, answered_b) = mpsc::channel();
        let cfg_b = client(mac_b);
        let b = std::thread::spawn(move || {
            discover_and_fetch_with(&cfg_b, |e| {
                if matches!(e, PxeEvent::Answered { .. }) {
                    let _ = answered_b_tx.send(());
                }
            })
        });
        answered_b
            .recv_timeout(Duration::from_secs(30))
            .expect("B answered");
        resume.store(true, Ordering::Relaxed);
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        stop.store(true, Ordering::Relaxed);
        let opened = fs_thread.join().unwrap();
        bs_thread.join().unwrap();
        drop(dead);

        let ra = ra.unwrap();
        let rb = rb.unwrap();
        for r in [&ra, &rb] {
            assert_eq!(r.data.as_deref(), Some(&file[..]));
            assert_eq!(r.len, file.len() as u64);
            assert_eq!(r.sha256, <[u8; 32]>::from(Sha256::digest(&file)));
            assert_eq!(
                (r.file.as_str(), r.group, r.file_server),
                ("boot.0", group, fs)
            );
            assert_eq!(r.boot_server, lo);
            assert!(r.answered_at <= r.first_block_at && r.first_block_at <= r.done_at);
        }
        assert_eq!(
            (ra.start, ra.first_block, ra.waits, ra.answers),
            (TransferStart::Opened, 1, 1, 2),
            "{ra:?}"
        );
        assert!(ra.rrqs >= 1, "{ra:?}");
        assert_eq!(
            (rb.start, rb.waits, rb.answers),
            (TransferStart::JoinedLate, 0, 1),
            "{rb:?}"
        );
        // Block 11 unless the server had to resend one of the first ten.
        assert!((2..=11).contains(&rb.first_block), "{rb:?}");
        assert!(rb.rrqs >= 1, "B re-opened for the head it missed: {rb:?}");
        assert!(
            opened >= 2,
            "A's transfer, then B's for the missing head: {opened}"
        );
        let ev: Vec<PxeEvent> = events_a.try_iter().collect();
        let kinds: Vec<&str> = ev
            .iter()
            .map(|e| match e {
                PxeEvent::Asking(_) => "asking",
                PxeEvent::Wait { .. } => "wait",
                PxeEvent::Answered { file_server, .. } if *file_server == dead_addr => "dead",
                PxeEvent::Answered { .. } => "answered",
                PxeEvent::FirstBlock { .. } => "first",
                PxeEvent::Stalled(_) => "stalled",
            })
            .filter(|k| *k != "asking")
            .collect();
        assert_eq!(
            kinds,
            ["wait", "dead", "stalled", "answered", "first"],
            "{ev:?}"
        );
    }
}

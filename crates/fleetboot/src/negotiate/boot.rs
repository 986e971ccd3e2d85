//! `fleetboot negotiate`: a PXE boot server on UDP 4011 whose answers carry the boot file
//! and MTFTP parameters (option 43 sub-options 1-5), each (group, port) cleared with the
//! other negotiators and prepared at a file server first ([`Negotiator`]).
//!
//! A boot server discovery REQUEST (option 60 `PXEClient`, option 43 with sub-option 71
//! naming boot item type `0x8000 + i`) asks for `boot_files[i]`. The negotiator answers at
//! once when it already holds an assignment for that file; otherwise it starts clearing and
//! sends the client a *wait packet* (seed 000: "a packet to the client asking the client to
//! wait for a period of time"), and another on each conflict: a DHCPACK without a boot file
//! whose option 43 carries [`SUB_WAIT_MS`]. The real answer follows when the assignment is
//! ready.

use super::net::{self, Records};
use crate::config::{Config, NegotiateConfig};
use anyhow::{Context, Result};
use fleetboot_dhcp::codec::{opt, BOOTREPLY};
use fleetboot_dhcp::pxe::{discovery, BootItem, PxeOptions};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_negotiate::{Assignment, Dest, Event, Negotiator, NegotiatorConfig, Slot};
use serde_json::json;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Boot item types from here on select `boot_files[type - BASE]`.
pub const BOOT_TYPE_BASE: u16 = 0x8000;

pub use fleetboot_dhcp::pxe::SUB_WAIT_MS;

struct Pending {
    dest: SocketAddrV4,
    req: DhcpMessage,
    item: BootItem,
    since: Instant,
}

fn mac_token(m: &DhcpMessage) -> u64 {
    m.chaddr[..6]
        .iter()
        .fold(0u64, |t, b| (t << 8) | u64::from(*b))
}

fn mac_str(t: u64) -> String {
    (0..6)
        .rev()
        .map(|i| format!("{:02x}", (t >> (8 * i)) as u8))
        .collect::<Vec<_>>()
        .join(":")
}

/// Which file a boot server discovery REQUEST asks for, and the boot item to echo.
pub fn requested_file(cfg: &NegotiateConfig, m: &DhcpMessage) -> Option<(String, BootItem)> {
    if m.message_type() != Some(MessageType::Request) {
        return None;
    }
    if !m.vendor_class().is_some_and(|v| v.starts_with("PXEClient")) {
        return None;
    }
    let pxe = PxeOptions::decode(m.option(opt::VENDOR_SPECIFIC)?).ok()?;
    let item = pxe.boot_item.unwrap_or(BootItem {
        server_type: BOOT_TYPE_BASE,
        layer: 0,
    });
    let i = usize::from(item.server_type.checked_sub(BOOT_TYPE_BASE)?);
    Some((cfg.boot_files.get(i)?.clone(), item))
}

fn has_boot_item(m: &DhcpMessage) -> bool {
    m.option(opt::VENDOR_SPECIFIC)
        .and_then(|v| PxeOptions::decode(v).ok())
        .is_some_and(|p| p.boot_item.is_some())
}

/// A DHCPACK to `req` from this server: no boot file, option 60 `PXEClient`, option 54.
fn ack_to(me: Ipv4Addr, req: &DhcpMessage) -> DhcpMessage {
    let mut r = DhcpMessage {
        op: BOOTREPLY,
        htype: req.htype,
        hlen: req.hlen,
        hops: req.hops,
        xid: req.xid,
        flags: req.flags,
        ciaddr: req.ciaddr,
        giaddr: req.giaddr,
        chaddr: req.chaddr,
        options: vec![(opt::MESSAGE_TYPE, vec![MessageType::Ack as u8])],
        ..DhcpMessage::default()
    };
    r.set_option(opt::SERVER_ID, me.octets().to_vec());
    r.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
    r
}

/// The DHCPACK from port 4011: boot file, file server as siaddr, MTFTP sub-options 1-5.
pub fn reply(
    cfg: &NegotiateConfig,
    me: Ipv4Addr,
    req: &DhcpMessage,
    item: BootItem,
    a: &Assignment,
) -> Vec<u8> {
    let mut r = ack_to(me, req);
    r.siaddr = a.file_server;
    r.file = a.file.as_bytes().to_vec();
    let pxe = PxeOptions {
        mtftp_ip: Some(a.slot.group),
        mtftp_client_port: Some(a.slot.port),
        mtftp_server_port: Some(a.server_port),
        mtftp_timeout: Some(cfg.mtftp_timeout),
        mtftp_delay: Some(cfg.mtftp_delay),
        discovery_control: Some(discovery::USE_BOOTFILE),
        boot_item: Some(item),
        ..Default::default()
    };
    r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    r.encode()
}

/// The wait packet: a DHCPACK from port 4011 without a boot file (or MTFTP sub-options)
/// whose option 43 echoes the boot item and carries [`SUB_WAIT_MS`] = `wait`.
pub fn wait_packet(me: Ipv4Addr, req: &DhcpMessage, item: BootItem, wait: Duration) -> Vec<u8> {
    let mut r = ack_to(me, req);
    let ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
    let pxe = PxeOptions {
        boot_item: Some(item),
        other: vec![(SUB_WAIT_MS, ms.to_be_bytes().to_vec())],
        ..Default::default()
    };
    r.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    r.encode()
}

fn slot_json(a: &Assignment) -> serde_json::Value {
    json!({"file": a.file, "group": a.slot.group.to_string(), "port": a.slot.port,
        "file_server": a.file_server.to_string(), "server_port": a.server_port})
}

/// The clients' side of the shell: their pending REQUESTs, and what each [`Event`] of the
/// negotiator sends them (answers, wait packets) and records.
struct Clients {
    cfg: NegotiateConfig,
    me: Ipv4Addr,
    pending: HashMap<u64, Pending>,
    /// The file of the [`Event::Activated`] just handled: the [`Event::Ready`]s for it that
    /// follow directly are the clearing job's waiters (answers recorded `"cleared": true`).
    activated: Option<String>,
}

impl Clients {
    fn new(cfg: NegotiateConfig, me: Ipv4Addr) -> Clients {
        Clients {
            cfg,
            me,
            pending: HashMap::new(),
            activated: None,
        }
    }

    /// Records one batch of events (all the negotiator had); returns the datagrams to send
    /// to clients from port 4011.
    fn on_events(
        &mut self,
        now: Instant,
        events: impl Iterator<Item = Event>,
        rec: &Records,
    ) -> Vec<(SocketAddrV4, Vec<u8>)> {
        self.activated = None;
        let out = events.filter_map(|e| self.on_event(now, e, rec)).collect();
        self.activated = None;
        out
    }

    /// Records `e`; returns the datagram to send to a client from port 4011, if any.
    fn on_event(
        &mut self,
        now: Instant,
        e: Event,
        rec: &Records,
    ) -> Option<(SocketAddrV4, Vec<u8>)> {
        let ts = net::unix_ms();
        let me = self.me.to_string();
        let cleared = matches!(&e, Event::Ready { assignment, .. }
            if self.activated.as_deref() == Some(assignment.file.as_str()));
        self.activated = match &e {
            Event::Activated(a) => Some(a.file.clone()),
            _ if cleared => self.activated.take(),
            _ => None,
        };
        match e {
            Event::Ready { client, assignment } => {
                let p = self.pending.remove(&client)?;
                p.req.vendor_class()?;
                let bytes = reply(&self.cfg, self.me, &p.req, p.item, &assignment);
                let mut v = slot_json(&assignment);
                v["ts_ms"] = ts.into();
                v["role"] = "negotiator".into();
                v["server"] = me.into();
                v["event"] = "answered".into();
                v["client"] = mac_str(client).into();
                v["cleared"] = cleared.into();
                v["waited_ms"] = (now.saturating_duration_since(p.since).as_millis() as u64).into();
                rec.write(v);
                Some((p.dest, bytes))
            }
            Event::Wait { client, file } => {
                let p = self.pending.get(&client)?;
                let wait = self.cfg.wait_period;
                rec.write(
                    json!({"ts_ms": ts, "role": "negotiator", "server": me, "event": "wait",
                    "client": mac_str(client), "file": file, "wait_ms": wait.as_millis() as u64}),
                );
                Some((p.dest, wait_packet(self.me, &p.req, p.item, wait)))
            }
            Event::Failed {
                client,
                file,
                reason,
            } => {
                self.pending.remove(&client);
                rec.write(
                    json!({"ts_ms": ts, "role": "negotiator", "server": me, "event": "failed",
                    "client": mac_str(client), "file": file, "reason": reason}),
                );
                None
            }
            Event::Conflict { slot, file, by } => {
                rec.write(json!({"ts_ms": ts, "role": "negotiator", "server": me, "event": "conflict",
                    "group": slot.group.to_string(), "port": slot.port, "file": file, "by": by.to_string()}));
                None
            }
            Event::Activated(a) => {
                let mut v = slot_json(&a);
                v["ts_ms"] = ts.into();
                v["role"] = "negotiator".into();
                v["server"] = me.into();
                v["event"] = "activated".into();
                rec.write(v);
                None
            }
            Event::Released { assignment, reason } => {
                let mut v = slot_json(&assignment);
                v["ts_ms"] = ts.into();
                v["role"] = "negotiator".into();
                v["server"] = me.into();
                v["event"] = "released".into();
                v["reason"] = reason.into();
                rec.write(v);
                None
            }
        }
    }
}

/// What `fleetboot serve` does with a port 4011 request the negotiator does not answer:
/// the ProxyDHCP REQUEST (no boot item) and boot items outside the negotiator's range go to
/// the DHCP engine, which returns the datagrams to send from port 4011.
pub type Fallback = Box<dyn FnMut(SocketAddrV4, &[u8]) -> Vec<(SocketAddrV4, Vec<u8>)> + Send>;

/// `fleetboot negotiate`: the negotiator alone on port 4011.
pub fn run(config: Config) -> Result<()> {
    run_with(config, None)
}

/// The negotiator's loop. With a `fallback` (inside `fleetboot serve`), a REQUEST without a
/// boot item is a ProxyDHCP REQUEST and goes to it, as does anything that is not a boot
/// server discovery for one of `boot_files`; without one, a REQUEST without a boot item
/// asks for `boot_files[0]`.
pub fn run_with(config: Config, mut fallback: Option<Fallback>) -> Result<()> {
    let cfg = config
        .negotiate
        .clone()
        .context("no [negotiate] section in the config")?;
    let me = config.address;
    let ttl = cfg.multicast_ttl;
    let any = |port| SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let pxe = net::udp(any(cfg.listen_port), me, ttl, false)?;
    let peer = net::udp(any(cfg.peers.port), me, ttl, true)?;
    if let Some(g) = cfg.peers.group {
        net::join(&peer, g, me)?;
    }
    let fs = net::udp(SocketAddrV4::new(me, 0), me, ttl, false)?;
    let rec = Records::open(cfg.records.as_deref())?;
    let slots: Vec<Slot> = cfg
        .groups
        .iter()
        .map(|&group| Slot {
            group,
            port: cfg.client_port,
        })
        .collect();
    let mut nc = NegotiatorConfig::new(me, slots, cfg.server_port, cfg.file_servers.clone());
    nc.wait_period = cfg.wait_period;
    nc.used_ttl = cfg.used_ttl;
    nc.hold = cfg.hold;
    nc.confirm_within = cfg.confirm_within;
    let mut neg = Negotiator::new(nc);
    let mut clients = Clients::new(cfg.clone(), me);
    rec.write(json!({"ts_ms": net::unix_ms(), "role": "negotiator", "server": me.to_string(), "event": "started",
        "port": cfg.listen_port, "file_servers": cfg.file_servers.iter().map(|s| s.to_string()).collect::<Vec<_>>()}));
    tracing::info!(
        "fleetboot negotiate on {me}:{}: {} boot files, {} groups",
        cfg.listen_port,
        cfg.boot_files.len(),
        cfg.groups.len()
    );
    let mut buf = vec![0u8; 65536];
    loop {
        let ready = net::wait(
            &[&pxe, &peer, &fs],
            neg.poll_timeout(),
            Duration::from_millis(200),
        );
        let now = Instant::now();
        if ready[0] {
            let mut asks = Vec::new();
            let mut passed = Vec::new();
            net::drain(&pxe, &mut buf, |from, bytes| {
                let Ok(m) = DhcpMessage::parse(bytes) else {
                    return;
                };
                let asked = requested_file(&cfg, &m).filter(|_| fallback.is_none() || has_boot_item(&m));
                let Some((file, item)) = asked else {
                    if let Some(f) = fallback.as_mut() {
                        passed.extend(f(from, bytes));
                    }
                    return;
                };
                let dest = if !from.ip().is_unspecified() {
                    from
                } else if !m.ciaddr.is_unspecified() {
                    SocketAddrV4::new(m.ciaddr, 68)
                } else {
                    return;
                };
                asks.push((
                    mac_token(&m),
                    file,
                    Pending {
                        dest,
                        req: m,
                        item,
                        since: now,
                    },
                ));
            });
            for (to, bytes) in passed {
                net::send(&pxe, to, &bytes);
            }
            for (token, file, p) in asks {
                clients.pending.insert(token, p);
                neg.request(now, token, &file);
            }
        }
        if ready[1] {
            net::drain(&peer, &mut buf, |from, bytes| {
                neg.handle_peer(now, from, bytes)
            });
        }
        if ready[2] {
            net::drain(&fs, &mut buf, |from, bytes| {
                neg.handle_file_server(now, from, bytes)
            });
        }
        if neg.poll_timeout().is_some_and(|t| t <= now) {
            neg.handle_timeout(now);
        }
        while let Some(t) = neg.poll_transmit() {
            match t.dest {
                Dest::Peers => {
                    if let Some(g) = cfg.peers.group {
                        net::send(&peer, SocketAddrV4::new(g, cfg.peers.port), &t.bytes);
                    }
                    for p in cfg.peers.list.iter().filter(|p| **p != me) {
                        net::send(&peer, SocketAddrV4::new(*p, cfg.peers.port), &t.bytes);
                    }
                }
                Dest::Unicast(a) if a.port() == cfg.peers.port => net::send(&peer, a, &t.bytes),
                Dest::Unicast(a) => net::send(&fs, a, &t.bytes),
            }
        }
        let events = std::iter::from_fn(|| neg.poll_event());
        for (to, bytes) in clients.on_events(now, events, &rec) {
            net::send(&pxe, to, &bytes);
        }
        // Clients that gave up long ago are forgotten (they will ask again).
        clients
            .pending
            .retain(|_, p| now.saturating_duration_since(p.since) < Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn cfg() -> NegotiateConfig {
        let text = "[server]\naddress = \"10.77.0.11\"\n[dhcp]\nmode = \"off\"\n[negotiate]\n\
                    boot_files = [\"a.0\", \"b.efi\"]\nfile_servers = [\"10.77.0.21\"]\n\
                    groups = [\"239.255.1.1\", \"239.255.1.4\"]\npeers = [\"10.77.0.12\"]\n\
                    mtftp_timeout = 3\nmtftp_delay = 4\n";
        Config::parse(text, Path::new("/"))
            .unwrap()
            .negotiate
            .unwrap()
    }

    fn discovery(item: Option<u16>, class: &str) -> DhcpMessage {
        let mut m = DhcpMessage {
            xid: 77,
            ciaddr: Ipv4Addr::new(10, 77, 0, 101),
            ..Default::default()
        };
        m.chaddr[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
        m.set_option(opt::VENDOR_CLASS, class.as_bytes().to_vec());
        let pxe = PxeOptions {
            boot_item: item.map(|t| BootItem {
                server_type: t,
                layer: 0,
            }),
            ..Default::default()
        };
        m.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
        m
    }

    #[test]
    fn boot_item_selects_the_file_and_the_ack_carries_mtftp_sub_options() {
        let c = cfg();
        let m = discovery(Some(0x8001), "PXEClient:Arch:00000:UNDI:002001");
        let (file, item) = requested_file(&c, &m).unwrap();
        assert_eq!(file, "b.efi");
        assert_eq!(
            requested_file(&c, &discovery(None, "PXEClient")).unwrap().0,
            "a.0"
        );
        assert_eq!(
            requested_file(&c, &discovery(Some(0x8002), "PXEClient")),
            None,
            "no such item"
        );
        assert_eq!(
            requested_file(&c, &discovery(Some(0x8000), "HTTPClient")),
            None
        );
        assert_eq!(mac_str(mac_token(&m)), "52:54:00:01:02:03");
        let a = Assignment {
            file: file.clone(),
            file_server: Ipv4Addr::new(10, 77, 0, 21),
            server_port: 1759,
            slot: Slot {
                group: Ipv4Addr::new(239, 255, 1, 3),
                port: 1758,
            },
        };
        let r = DhcpMessage::parse(&reply(&c, Ipv4Addr::new(10, 77, 0, 11), &m, item, &a)).unwrap();
        assert_eq!(r.op, BOOTREPLY);
        assert_eq!(r.xid, 77);
        assert_eq!(r.message_type(), Some(MessageType::Ack));
        assert_eq!(r.siaddr, a.file_server);
        assert_eq!(r.file, b"b.efi");
        assert_eq!(r.server_id(), Some(Ipv4Addr::new(10, 77, 0, 11)));
        let p = PxeOptions::decode(r.option(opt::VENDOR_SPECIFIC).unwrap()).unwrap();
        assert_eq!(p.mtftp_ip, Some(a.slot.group));
        assert_eq!(p.mtftp_client_port, Some(1758));
        assert_eq!(p.mtftp_server_port, Some(1759));
        assert_eq!(p.mtftp_timeout, Some(3));
        assert_eq!(p.mtftp_delay, Some(4));
        assert_eq!(p.boot_item, Some(item));
    }

    #[test]
    fn wait_packet_is_an_ack_without_boot_file_carrying_the_wait_in_ms() {
        let m = discovery(Some(0x8001), "PXEClient:Arch:00000:UNDI:002001");
        let item = BootItem {
            server_type: 0x8001,
            layer: 0,
        };
        let me = Ipv4Addr::new(10, 77, 0, 11);
        let bytes = wait_packet(me, &m, item, Duration::from_millis(500));
        let r = DhcpMessage::parse(&bytes).unwrap();
        assert_eq!(r.op, BOOTREPLY);
        assert_eq!(r.xid, 77);
        assert_eq!(r.chaddr, m.chaddr);
        assert_eq!(r.ciaddr, m.ciaddr);
        assert_eq!(r.message_type(), Some(MessageType::Ack));
        assert_eq!(r.server_id(), Some(me));
        assert_eq!(r.vendor_class().as_deref(), Some("PXEClient"));
        assert!(r.file.is_empty(), "a wait packet names no boot file");
        assert_eq!(r.siaddr, Ipv4Addr::UNSPECIFIED);
        let raw = r.option(opt::VENDOR_SPECIFIC).unwrap();
        // Sub-option 0xB0, length 4, 500 big-endian; then 71 (the boot item) and the end.
        let sub = [SUB_WAIT_MS, 4, 0, 0, 0x01, 0xF4];
        assert!(raw.windows(6).any(|w| w == sub), "{raw:02x?}");
        let p = PxeOptions::decode(raw).unwrap();
        assert_eq!(
            p,
            PxeOptions {
                boot_item: Some(item),
                other: vec![(SUB_WAIT_MS, vec![0, 0, 0x01, 0xF4])],
                ..Default::default()
            },
            "no MTFTP sub-options, no discovery control"
        );
        assert_eq!(fleetboot_dhcp::pxe::wait_period(&r), Some(Duration::from_millis(500)));
        // The real answer is not a wait packet.
        let a = Assignment {
            file: "b.efi".into(),
            file_server: Ipv4Addr::new(10, 77, 0, 21),
            server_port: 1759,
            slot: Slot {
                group: Ipv4Addr::new(239, 255, 1, 3),
                port: 1758,
            },
        };
        let answer = DhcpMessage::parse(&reply(&cfg(), me, &m, item, &a)).unwrap();
        assert_eq!(fleetboot_dhcp::pxe::wait_period(&answer), None);
        assert!(
            (128..=254).contains(&SUB_WAIT_MS),
            "vendor range of PXE option 43"
        );
    }

    /// The shell's event handling over a real [`Negotiator`]: clearing starts (wait packet
    /// 1), a peer answers the query (conflict: wait packet 2), the next slot clears and the
    /// file server ACKs (the answer, recorded as `cleared`); a second client for the same
    /// file is answered at once with no wait.
    #[test]
    fn clearing_sends_a_wait_packet_and_another_on_each_conflict() {
        use fleetboot_negotiate::{ConflictOp, ConflictPacket, FsMessage, FsOp};
        let c = cfg();
        let me = Ipv4Addr::new(10, 77, 0, 11);
        let path =
            std::env::temp_dir().join(format!("fleetboot-wait-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rec = Records::open(Some(&path)).unwrap();
        let slots = c
            .groups
            .iter()
            .map(|&group| Slot {
                group,
                port: c.client_port,
            })
            .collect();
        let mut nc = NegotiatorConfig::new(me, slots, c.server_port, c.file_servers.clone());
        nc.wait_period = c.wait_period;
        let mut neg = Negotiator::new(nc);
        let mut clients = Clients::new(c.clone(), me);
        let dest = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 101), 40000);
        let ask = |clients: &mut Clients, neg: &mut Negotiator, now, mac: u8| {
            let mut m = discovery(Some(0x8000), "PXEClient");
            m.chaddr[5] = mac;
            let (file, item) = requested_file(&c, &m).unwrap();
            let token = mac_token(&m);
            clients.pending.insert(
                token,
                Pending {
                    dest,
                    req: m,
                    item,
                    since: now,
                },
            );
            neg.request(now, token, &file);
        };
        let sent = |clients: &mut Clients, neg: &mut Negotiator, now| {
            clients.on_events(now, std::iter::from_fn(|| neg.poll_event()), &rec)
        };
        let waits = |out: &[(SocketAddrV4, Vec<u8>)]| {
            out.iter()
                .filter(|(to, b)| {
                    *to == dest
                        && fleetboot_dhcp::pxe::wait_period(&DhcpMessage::parse(b).unwrap()) == Some(c.wait_period)
                })
                .count()
        };

        let mut now = Instant::now();
        ask(&mut clients, &mut neg, now, 3);
        let out = sent(&mut clients, &mut neg, now);
        assert_eq!(
            (out.len(), waits(&out)),
            (1, 1),
            "clearing started: one wait"
        );
        let query = neg.poll_transmit().unwrap();
        assert_eq!(query.dest, Dest::Peers);
        let q = ConflictPacket::parse(&query.bytes).unwrap();
        assert_eq!(q.op, ConflictOp::Query);
        let echo = q.with_op(ConflictOp::Response).encode().unwrap();
        let peer = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 12), c.peers.port);
        neg.handle_peer(now, peer, &echo);
        let out = sent(&mut clients, &mut neg, now);
        assert_eq!(
            (out.len(), waits(&out)),
            (1, 1),
            "the conflict: another wait"
        );

        // Nobody answers for the next slot: PREPARE, ACK, the answer.
        let prep = loop {
            now = neg.poll_timeout().unwrap();
            neg.handle_timeout(now);
            let t: Vec<_> = std::iter::from_fn(|| neg.poll_transmit()).collect();
            if let Some(t) = t.iter().find(|t| matches!(t.dest, Dest::Unicast(_))) {
                break FsMessage::parse(&t.bytes).unwrap();
            }
        };
        assert_eq!(prep.op, FsOp::Prepare);
        let ack = prep.reply(FsOp::Ack, None).encode().unwrap();
        neg.handle_file_server(now, c.file_servers[0], &ack);
        let out = sent(&mut clients, &mut neg, now);
        assert_eq!((out.len(), waits(&out)), (1, 0));
        let answer = DhcpMessage::parse(&out[0].1).unwrap();
        assert_eq!(answer.file, b"a.0");
        assert_ne!(
            PxeOptions::decode(answer.option(opt::VENDOR_SPECIFIC).unwrap())
                .unwrap()
                .mtftp_ip,
            Some(q.group),
            "not the conflicting group"
        );
        // A second client: answered at once, no wait, not `cleared`.
        ask(&mut clients, &mut neg, now, 4);
        let out = sent(&mut clients, &mut neg, now);
        assert_eq!((out.len(), waits(&out)), (1, 0));

        let recs: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let _ = std::fs::remove_file(&path);
        let of = |ev: &str, client: &str| {
            recs.iter()
                .filter(|r| r["event"] == ev && r["client"] == client)
                .collect::<Vec<_>>()
        };
        let w = of("wait", "52:54:00:01:02:03");
        assert_eq!(w.len(), 2, "{recs:?}");
        for r in &w {
            assert_eq!(r["file"], "a.0");
            assert_eq!(r["wait_ms"], 1000);
            assert_eq!(r["server"], "10.77.0.11");
        }
        assert_eq!(recs.iter().filter(|r| r["event"] == "conflict").count(), 1);
        let a = of("answered", "52:54:00:01:02:03");
        assert_eq!((a.len(), &a[0]["cleared"]), (1, &json!(true)));
        assert!(of("wait", "52:54:00:01:02:04").is_empty());
        let a = of("answered", "52:54:00:01:02:04");
        assert_eq!((a.len(), &a[0]["cleared"]), (1, &json!(false)));
    }
}

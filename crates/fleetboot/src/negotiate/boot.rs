//! `fleetboot negotiate`: a PXE boot server on UDP 4011 whose answers carry the boot file
//! and MTFTP parameters (option 43 sub-options 1-5), each (group, port) cleared with the
//! other negotiators and prepared at a file server first ([`Negotiator`]).
//!
//! A boot server discovery REQUEST (option 60 `PXEClient`, option 43 with sub-option 71
//! naming boot item type `0x8000 + i`) asks for `boot_files[i]`. The negotiator answers at
//! once when it already holds an assignment for that file; otherwise it starts clearing and
//! stays silent (that is the "wait": the client repeats its REQUEST, as PXE ROMs do), and
//! answers when the assignment is ready.

use super::config::NegotiateConfig;
use super::net::{self, Records};
use crate::config::Config;
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

/// The DHCPACK from port 4011: boot file, file server as siaddr, MTFTP sub-options 1-5.
pub fn reply(
    cfg: &NegotiateConfig,
    me: Ipv4Addr,
    req: &DhcpMessage,
    item: BootItem,
    a: &Assignment,
) -> Vec<u8> {
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
        siaddr: a.file_server,
        file: a.file.as_bytes().to_vec(),
        options: vec![(opt::MESSAGE_TYPE, vec![MessageType::Ack as u8])],
        ..DhcpMessage::default()
    };
    r.set_option(opt::SERVER_ID, me.octets().to_vec());
    r.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
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

fn slot_json(a: &Assignment) -> serde_json::Value {
    json!({"file": a.file, "group": a.slot.group.to_string(), "port": a.slot.port,
        "file_server": a.file_server.to_string(), "server_port": a.server_port})
}

pub fn run(config: Config) -> Result<()> {
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
    let mut neg = Negotiator::new(nc);
    let mut pending: HashMap<u64, Pending> = HashMap::new();
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
            net::drain(&pxe, &mut buf, |from, bytes| {
                let Ok(m) = DhcpMessage::parse(bytes) else {
                    return;
                };
                let Some((file, item)) = requested_file(&cfg, &m) else {
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
            for (token, file, p) in asks {
                pending.insert(token, p);
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
        while let Some(e) = neg.poll_event() {
            let ts = net::unix_ms();
            match e {
                Event::Ready { client, assignment } => {
                    let Some(p) = pending.remove(&client) else {
                        continue;
                    };
                    if p.req.vendor_class().is_none() {
                        continue;
                    }
                    net::send(&pxe, p.dest, &reply(&cfg, me, &p.req, p.item, &assignment));
                    let mut v = slot_json(&assignment);
                    v["ts_ms"] = ts.into();
                    v["role"] = "negotiator".into();
                    v["server"] = me.to_string().into();
                    v["event"] = "answered".into();
                    v["client"] = mac_str(client).into();
                    v["waited_ms"] =
                        (now.saturating_duration_since(p.since).as_millis() as u64).into();
                    rec.write(v);
                }
                Event::Wait { client, file } => {
                    tracing::debug!("{}: wait for {file}", mac_str(client));
                }
                Event::Failed {
                    client,
                    file,
                    reason,
                } => {
                    pending.remove(&client);
                    rec.write(json!({"ts_ms": ts, "role": "negotiator", "server": me.to_string(), "event": "failed",
                        "client": mac_str(client), "file": file, "reason": reason}));
                }
                Event::Conflict { slot, file, by } => {
                    rec.write(json!({"ts_ms": ts, "role": "negotiator", "server": me.to_string(), "event": "conflict",
                        "group": slot.group.to_string(), "port": slot.port, "file": file, "by": by.to_string()}));
                }
                Event::Activated(a) => {
                    let mut v = slot_json(&a);
                    v["ts_ms"] = ts.into();
                    v["role"] = "negotiator".into();
                    v["server"] = me.to_string().into();
                    v["event"] = "activated".into();
                    rec.write(v);
                }
                Event::Released { assignment, reason } => {
                    let mut v = slot_json(&assignment);
                    v["ts_ms"] = ts.into();
                    v["role"] = "negotiator".into();
                    v["server"] = me.to_string().into();
                    v["event"] = "released".into();
                    v["reason"] = reason.into();
                    rec.write(v);
                }
            }
        }
        // Clients that gave up long ago are forgotten (they will ask again).
        pending.retain(|_, p| now.saturating_duration_since(p.since) < Duration::from_secs(60));
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
}

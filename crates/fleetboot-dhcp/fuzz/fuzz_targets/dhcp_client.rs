//! The DHCP client (what `fleetboot emulate`, the address pools and the node agent speak
//! with), fed by whoever answers on the network: a real DHCP engine's replies, as sent or
//! altered, and datagrams made up from nothing but carrying the client's `xid` and
//! `chaddr` so that they reach its state machine.
//!
//! Input: one byte choosing the client (bit 0: PXE firmware, else a host), then records of
//! one control byte (bits 0-1: deliver the engine's replies as they are / XORed with the
//! record / the record with the client's xid and chaddr written in / the record as is;
//! bit 4: thirty seconds pass first), two length bytes (big-endian) and the record. Nothing may panic and
//! everything the client sends parses as DHCP.

#![no_main]

use fleetboot_boot::{ClientIdentity, MacAddr};
use fleetboot_dhcp::{BootOffer, ClientConfig, DhcpClient, DhcpMessage, Engine, EngineConfig, Event, Mode, Subnet};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const XID: u32 = 0x1234_5678;
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

fn advisor(_: &ClientIdentity) -> Option<BootOffer> {
    Some(BootOffer { file: "undionly.kpxe".into(), next_server: SERVER })
}

fuzz_target!(|input: &[u8]| {
    let Some((&kind, mut rest)) = input.split_first() else { return };
    let mut now = Instant::now();
    let mut unix = 1_800_000_000u64;
    let mac = MacAddr(MAC);
    let config = if kind & 1 != 0 { ClientConfig::pxe(mac, [7; 16]) } else { ClientConfig::host(mac, b"fuzz".to_vec()) };
    let mut client = DhcpClient::new(config, XID, now);
    let mut engine = Engine::new(
        EngineConfig {
            mode: Mode::Server,
            server_ip: SERVER,
            subnets: vec![Subnet {
                network: Ipv4Addr::new(10, 77, 0, 0),
                prefix_len: 24,
                range_start: Ipv4Addr::new(10, 77, 0, 10),
                range_end: Ipv4Addr::new(10, 77, 0, 20),
                router: Some(SERVER),
                dns: vec![],
                domain: None,
                lease_time: 120,
            }],
            ..EngineConfig::default()
        },
        advisor as fn(&ClientIdentity) -> Option<BootOffer>,
    )
    .expect("a valid configuration");
    let from_client = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));
    let from_server = SocketAddr::V4(SocketAddrV4::new(SERVER, 67));
    let mut buf = Vec::new();
    let mut replies: Vec<Vec<u8>> = Vec::new();
    // Two length bytes: a DHCP message is longer than 255 bytes.
    while let [control, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (record, tail) = tail.split_at(len);
        rest = tail;
        if control & 0x10 != 0 {
            now += Duration::from_secs(30);
            unix += 30;
            client.handle_timeout(now);
            engine.handle_timeout(now);
        }
        buf.clear();
        while let Some(t) = client.poll_transmit(now, &mut buf) {
            let sent = buf[buf.len() - t.size..].to_vec();
            assert!(DhcpMessage::parse(&sent).is_ok(), "the client sent something that does not parse");
            engine.handle(now, unix, from_client, &sent);
        }
        while let Some(ev) = engine.poll_event() {
            if let Event::Persist { ticket, .. } = ev {
                engine.committed(ticket);
            }
        }
        buf.clear();
        while let Some(t) = engine.poll_transmit(now, &mut buf) {
            replies.push(buf[buf.len() - t.size..].to_vec());
        }
        match control & 3 {
            0 => replies.drain(..).for_each(|r| client.handle(now, from_server, &r)),
            1 => {
                for mut r in replies.drain(..) {
                    r.iter_mut().zip(record).for_each(|(b, x)| *b ^= x);
                    client.handle(now, from_server, &r);
                }
            }
            2 => {
                let mut r = record.to_vec();
                if r.len() >= 34 {
                    r[4..8].copy_from_slice(&XID.to_be_bytes());
                    r[28..34].copy_from_slice(&MAC);
                }
                client.handle(now, from_server, &r);
            }
            _ => client.handle(now, from_server, record),
        }
        while client.poll_event().is_some() {}
    }
});

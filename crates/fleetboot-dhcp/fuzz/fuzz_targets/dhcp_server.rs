//! Port 67 and port 4011, fed by anyone on the boot network: the DHCP engine (server or
//! ProxyDHCP mode, with a reservation and relayed or direct senders) and the PXE boot
//! server, with lease commits that succeed or fail and time passing between datagrams.
//!
//! Input: one mode byte (bit 0: ProxyDHCP instead of server; bit 1: not authoritative),
//! then records of one control byte (bits 0-1: which of four senders, sender 3 a relay;
//! bit 2: to the boot server on 4011; bit 3: commits fail; bit 4: a minute passes first),
//! two length bytes (big-endian) and the datagram. Whatever they hold, nothing may panic, the replies
//! held for lease commits stay within the engine's bound, and every reply parses as DHCP.

#![no_main]

use fleetboot_boot::ClientIdentity;
use fleetboot_dhcp::{
    BootOffer, BootServer, BootServerConfig, DhcpMessage, Engine, EngineConfig, Event, Mode, Reservation, Subnet,
};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn advisor(id: &ClientIdentity) -> Option<BootOffer> {
    Some(BootOffer {
        file: if id.is_ipxe { "http://10.77.0.1:8080/boot.ipxe".into() } else { "undionly.kpxe".into() },
        next_server: SERVER,
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, mut rest)) = input.split_first() else { return };
    let config = EngineConfig {
        mode: if mode & 1 != 0 { Mode::Proxy } else { Mode::Server },
        server_ip: SERVER,
        subnets: vec![Subnet {
            network: Ipv4Addr::new(10, 77, 0, 0),
            prefix_len: 24,
            range_start: Ipv4Addr::new(10, 77, 0, 10),
            range_end: Ipv4Addr::new(10, 77, 0, 14),
            router: Some(SERVER),
            dns: vec![],
            domain: None,
            lease_time: 120,
        }],
        reservations: vec![Reservation { mac: None, client_id: Some(b"reserved".to_vec()), ip: Ipv4Addr::new(10, 77, 0, 50) }],
        authoritative: mode & 2 == 0,
        ..EngineConfig::default()
    };
    let advise = advisor as fn(&ClientIdentity) -> Option<BootOffer>;
    let mut engine = Engine::new(config, advise).expect("a valid configuration");
    let mut boot = BootServer::new(BootServerConfig { server_ip: SERVER, client_port: 68, proxy_requests: true, multicast: None }, advise);
    let mut now = Instant::now();
    let mut unix = 1_800_000_000u64;
    let mut buf = Vec::new();
    // Two length bytes: a DHCP message is longer than 255 bytes.
    while let [control, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (dgram, tail) = tail.split_at(len);
        rest = tail;
        if control & 0x10 != 0 {
            now += Duration::from_secs(60);
            unix += 60;
            engine.handle_timeout(now);
            boot.handle_timeout(now);
        }
        let sender = control & 3;
        let from = match sender {
            0 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)),
            3 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 1), 67)),
            n => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 10 + n), 68)),
        };
        if control & 4 != 0 {
            boot.handle(now, from, dgram);
        } else {
            engine.handle(now, unix, from, dgram);
        }
        while let Some(ev) = engine.poll_event() {
            if let Event::Persist { ticket, .. } = ev {
                if control & 8 != 0 {
                    engine.commit_failed(ticket);
                } else {
                    engine.committed(ticket);
                }
            }
        }
        while boot.poll_event().is_some() {}
        assert!(engine.held() <= fleetboot_dhcp::engine::MAX_HELD);
        buf.clear();
        while let Some(t) = engine.poll_transmit(now, &mut buf) {
            let reply = &buf[buf.len() - t.size..];
            assert!(DhcpMessage::parse(reply).is_ok(), "the engine sent a reply that does not parse");
        }
        buf.clear();
        while let Some(t) = boot.poll_transmit(now, &mut buf) {
            let reply = &buf[buf.len() - t.size..];
            assert!(DhcpMessage::parse(reply).is_ok(), "the boot server sent a reply that does not parse");
        }
    }
});

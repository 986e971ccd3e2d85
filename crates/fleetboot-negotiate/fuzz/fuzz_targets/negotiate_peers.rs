//! The negotiation ports, fed by anyone on the boot network: a file server's control port
//! ([`FileRegistry::handle`]: PREPARE/DELETE), its conflict-query port
//! ([`FileRegistry::handle_peer`]), and a negotiator's peer and file-server ports
//! ([`Negotiator::handle_peer`], [`Negotiator::handle_file_server`]), with clients asking
//! the negotiator for files and time passing between datagrams.
//!
//! Input: records of one control byte (bits 0-1: which port; bits 2-3: which of four
//! senders; bit 4: a client asks for a file first; bit 5: five seconds pass first), one
//! length byte and the datagram. Whatever they hold, nothing may panic, the file server
//! never carries more than its `max_groups` slots, and every reply parses.

#![no_main]

use fleetboot_negotiate::{ConflictPacket, FileRegistry, FsMessage, Negotiator, NegotiatorConfig, Slot};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const MAX_GROUPS: usize = 4;

fuzz_target!(|input: &[u8]| {
    let server = Ipv4Addr::new(10, 0, 0, 9);
    let mut reg = FileRegistry::new(server, Duration::from_secs(30), |name: &str| name.starts_with('f')).with_max_groups(MAX_GROUPS);
    let slots = (1..=6).map(|i| Slot { group: Ipv4Addr::new(239, 0, 0, i), port: 1758 }).collect();
    let mut neg = Negotiator::new(NegotiatorConfig::new(
        Ipv4Addr::new(10, 0, 0, 2),
        slots,
        1759,
        vec![SocketAddrV4::new(server, 1760)],
        Vec::new(),
    ));
    let mut buf = Vec::new();
    let mut now = Instant::now();
    let mut rest = input;
    let mut client = 0u64;
    while let [control, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (dgram, tail) = tail.split_at(len);
        rest = tail;
        let from = Ipv4Addr::new(10, 0, 0, 1 + (control >> 2 & 3));
        if control & 0x20 != 0 {
            now += Duration::from_secs(5);
            reg.expire(now);
            neg.handle_timeout(now);
        }
        if control & 0x10 != 0 {
            client += 1;
            neg.request(now, client % 8, if client % 3 == 0 { "g" } else { "f" });
        }
        let v4 = |port| SocketAddr::V4(SocketAddrV4::new(from, port));
        match control & 3 {
            0 => reg.handle(now, v4(40000), dgram),
            1 => {
                reg.handle_peer(now, v4(1759), dgram);
            }
            2 => neg.handle_peer(now, v4(1759), dgram),
            _ => neg.handle_file_server(now, v4(1760), dgram),
        }
        assert!(reg.groups().len() <= MAX_GROUPS, "slots beyond max_groups");
        while reg.poll_event().is_some() {}
        for _ in 0..1024 {
            buf.clear();
            let Some(t) = reg.poll_transmit(now, &mut buf) else { break };
            let bytes = &buf[buf.len() - t.size..];
            assert!(
                FsMessage::parse(bytes).is_ok() || ConflictPacket::parse(bytes).is_ok(),
                "a file server sends what parses"
            );
        }
        for _ in 0..1024 {
            buf.clear();
            let Some(t) = neg.poll_transmit(now, &mut buf) else { break };
            let bytes = &buf[buf.len() - t.size..];
            assert!(
                ConflictPacket::parse(bytes).is_ok() || FsMessage::parse(bytes).is_ok(),
                "a negotiator sends what parses"
            );
        }
        while neg.poll_event().is_some() {}
    }
});

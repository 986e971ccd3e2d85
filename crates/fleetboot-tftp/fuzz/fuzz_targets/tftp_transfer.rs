//! A read request and what follows it, from the server's side: the first datagram is
//! parsed as the RRQ (anything else ends the run, as the shell answers it with an ERROR),
//! its options accepted into a [`ReadTransfer`] over a small file served octet or
//! netascii (as the RRQ's mode says); every later datagram comes from the client or from a
//! stranger, with timeouts between them — the same path as `fleetboot serve`'s TFTP
//! service, without sockets.
//!
//! Input: the RRQ's length (one byte), the RRQ, then records of one control byte (bit 0:
//! from a stranger, bit 1: a timeout passes first, bit 2: drain what the server sends),
//! one length byte and the datagram. Whatever they hold, nothing may panic, every datagram
//! the server sends must parse, and no DATA is larger than the accepted block size.

#![no_main]

use fleetboot_tftp::source::Netascii;
use fleetboot_tftp::{BlockSource, Mode, Packet, ReadTransfer, TransferConfig};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const FILE: &[u8] = b"#!ipxe\r\nchain http://10.0.0.1/boot.ipxe\nline\rwith a bare CR\n\0end";

fuzz_target!(|input: &[u8]| {
    let Some((&rrq_len, rest)) = input.split_first() else { return };
    let rrq_len = usize::from(rrq_len).min(rest.len());
    let (rrq, mut rest) = rest.split_at(rrq_len);
    let Ok(Packet::Rrq { mode, options, .. }) = Packet::parse(rrq) else { return };
    let mut octet: &[u8] = FILE;
    let mut netascii = Netascii::new(FILE, FILE.len() as u64);
    let (source, file_len): (&mut dyn BlockSource, u64) = match mode {
        Mode::Netascii => {
            let len = netascii.converted_len().expect("a slice reads");
            (&mut netascii, len)
        }
        _ => (&mut octet, FILE.len() as u64),
    };
    let client: SocketAddr = "10.0.0.7:2001".parse().unwrap();
    let stranger: SocketAddr = "10.0.0.8:2001".parse().unwrap();
    let mut now = Instant::now();
    let config = TransferConfig::default();
    let mut t = ReadTransfer::new(now, client, &options, file_len, &config);
    let mut buf = Vec::new();
    // Datagrams sent, for a debugger looking at a crash.
    let mut sent = 0usize;
    let mut drain = |t: &mut ReadTransfer, now: Instant, source: &mut dyn BlockSource, sent: &mut usize| {
        // A window is at most windowsize DATA plus answers to strangers.
        for _ in 0..1024 {
            buf.clear();
            let Some(tx) = t.poll_transmit(now, source, &mut buf) else { return };
            assert_eq!(tx.size, buf.len(), "one datagram per poll");
            match Packet::parse(&buf).expect("the server sends what parses") {
                Packet::Data { data, .. } => {
                    assert!(data.len() <= usize::from(t.accepted_options().blksize), "DATA within the block size");
                }
                Packet::Oack { .. } | Packet::Error { .. } => {}
                other => panic!("a read server sent {other:?}"),
            }
            *sent += 1;
        }
    };
    drain(&mut t, now, source, &mut sent);
    while let [control, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (dgram, tail) = tail.split_at(len);
        rest = tail;
        if control & 2 != 0 {
            now = t.poll_timeout().map_or(now, |d| d.max(now)) + Duration::from_millis(1);
            t.handle_timeout(now);
        }
        let from = if control & 1 != 0 { stranger } else { client };
        t.handle(now, from, dgram);
        if control & 4 != 0 {
            drain(&mut t, now, source, &mut sent);
        }
        if t.is_finished() {
            break;
        }
    }
    drain(&mut t, now, source, &mut sent);
});

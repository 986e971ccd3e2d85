//! A streaming sender with one registered receiver, fed arbitrary datagrams from that
//! receiver's address and another one, correctly tagged (see `common.rs`: key 0 is the
//! site key, 1 the receiver's key): it must never panic, never read outside the image,
//! and keep the state-machine contract while it streams, repairs and finishes.
#![no_main]

mod common;

use common::*;
use fleetboot_stream::wire::{Body, Packet, Register};
use fleetboot_stream::{MacKey, Sender, SenderConfig};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let group: SocketAddr = "239.192.0.1:10900".parse().unwrap();
    let a: SocketAddr = "10.0.0.2:10900".parse().unwrap();
    let b: SocketAddr = "10.0.0.3:10900".parse().unwrap();
    let mut now = Instant::now();
    let mut cfg = SenderConfig::new(SESSION, [1; 16], IMAGE as u64, BLOCK, SESSION_KEY, group);
    cfg.site_secret = SITE_SECRET;
    cfg.fec_group = 16;
    cfg.max_receivers = 4;
    cfg.solicit.start_at = Some(1);
    cfg.status_timeout = Duration::from_millis(5);
    cfg.max_rounds = 4;
    cfg.manifest = Some(manifest());
    let mut snd = Sender::new(now, cfg).unwrap();
    let site = MacKey::site(&SITE_SECRET);
    let mut reg = Vec::new();
    Packet { session: SESSION, body: Body::Register(Register { nonce: NONCE, cache_slots: 32 }) }
        .encode_append(&site, &mut reg)
        .unwrap();
    snd.handle(now, a, &reg);
    let mine = MacKey::receiver(&MacKey::session(&SESSION_KEY, SESSION), 1, NONCE);
    let mut out = Vec::new();
    let mut src = Image;
    for (n, d) in datagrams(data).enumerate() {
        now += Duration::from_millis(d.advance_ms);
        let key = match d.key {
            0 => Some(&site),
            1 => Some(&mine),
            _ => None,
        };
        snd.handle(now, if n % 4 == 3 { b } else { a }, &tagged(d.body, key));
        if snd.poll_timeout().is_some_and(|t| t <= now) {
            snd.handle_timeout(now);
        }
        out.clear();
        let mut sent = 0;
        while let Some(t) = snd.poll_transmit(now, &mut src, &mut out) {
            assert!(t.size <= out.len());
            sent += 1;
            assert!(sent < 100_000, "poll_transmit never stops");
        }
        assert!(snd.receivers().count() <= 8);
    }
});

//! A registered stream receiver that has the session's signed MANIFEST, fed arbitrary
//! datagrams, correctly tagged (see `common.rs`): it must never panic, never write
//! outside the image, never write a block that is not the image's (only blocks of hash
//! groups that checked out reach the sink), and keep the state-machine contract (its
//! timers move past `now`). Its memory for incomplete groups is small, so the fuzzer
//! also reaches the limit.
#![no_main]

mod common;

use common::*;
use fleetboot_stream::auth::{key_wrap_pad, xor16};
use fleetboot_stream::manifest::SessionManifest;
use fleetboot_stream::wire::{Announce, Body, ManifestChunk, Packet, Registered, SIGNATURE_LEN};
use fleetboot_stream::{BlockSink, MacKey, Receiver, ReceiverConfig};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

struct Mem(Vec<u8>);

impl BlockSink for Mem {
    fn write_block(&mut self, index: u32, data: &[u8]) -> std::io::Result<()> {
        let s = index as usize * BLOCK as usize;
        assert!(s + data.len() <= self.0.len(), "a write beyond the image");
        assert!(data.iter().all(|&b| b == index as u8), "block {index} written with bytes that are not the image's");
        self.0[s..s + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        let s = index as usize * BLOCK as usize;
        assert!(s + buf.len() <= self.0.len(), "a read beyond the image");
        buf.copy_from_slice(&self.0[s..s + buf.len()]);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let sender: SocketAddr = "10.0.0.1:4000".parse().unwrap();
    let site = MacKey::site(&SITE_SECRET);
    let session = MacKey::session(&SESSION_KEY, SESSION);
    let mut now = Instant::now();
    let mut cfg = ReceiverConfig::new([1; 16], NONCE);
    cfg.site_secret = SITE_SECRET;
    cfg.cache_slots = 16;
    cfg.max_fec_bytes = 64 << 10;
    cfg.max_pending_bytes = 8 << 10;
    cfg.sender_key = Some(sender_key().verifying_key().to_bytes());
    let mut rx = Receiver::new(now, cfg);
    let blocks = (IMAGE as u64).div_ceil(BLOCK as u64) as u32;
    let order: Vec<u32> = (0..blocks).collect();
    let mut sm = SessionManifest::new(manifest(), &order);
    let mut announce = Announce {
        image_id: [1; 16],
        image_size: IMAGE as u64,
        block_size: BLOCK,
        block_count: blocks,
        stream_len: blocks,
        fec_group: 16,
        rate: 1 << 20,
        solicit_ms: 100,
        ack_every: 4,
        flags: 0,
        manifest_root: [0; 32],
        signature: [0; SIGNATURE_LEN],
    };
    sm.sign_announce(SESSION, &mut announce);
    let mut b = Vec::new();
    Packet { session: SESSION, body: Body::Announce(announce) }.encode_append(&site, &mut b).unwrap();
    rx.handle(now, sender, &b);
    let pad = key_wrap_pad(&site, SESSION, 1, NONCE);
    b.clear();
    Packet { session: SESSION, body: Body::Registered(Registered { receiver: 1, nonce: NONCE, wrapped_key: xor16(&SESSION_KEY, &pad) }) }
        .encode_append(&site, &mut b)
        .unwrap();
    rx.handle(now, sender, &b);
    let chunk = sm.chunk(0).expect("one chunk");
    b.clear();
    Packet {
        session: SESSION,
        body: Body::Manifest(ManifestChunk {
            first: chunk.first,
            positions: chunk.positions,
            group_hashes: chunk.group_hashes,
            signature: chunk.signature,
        }),
    }
    .encode_append(&session, &mut b)
    .unwrap();
    rx.handle(now, sender, &b);
    assert_eq!(rx.stats().manifest_chunks, 1);
    let wrong = MacKey::from_bytes([0xEE; 32]);
    let mut sink = Mem(vec![0; IMAGE]);
    let mut out = Vec::new();
    for d in datagrams(data) {
        now += Duration::from_millis(d.advance_ms);
        let key = match d.key {
            0 => Some(&site),
            1 => Some(&session),
            2 => Some(&wrong),
            _ => None,
        };
        rx.handle(now, sender, &tagged(d.body, key));
        let _ = rx.drain(now, &mut sink, 8);
        if rx.poll_timeout().is_some_and(|t| t <= now) {
            rx.handle_timeout(now);
        }
        out.clear();
        while let Some(t) = rx.poll_transmit(now, &mut out) {
            assert!(t.size <= out.len());
        }
        if let Some(t) = rx.poll_timeout() {
            assert!(t > now, "a timer at or before now after handle_timeout and draining");
        }
    }
});

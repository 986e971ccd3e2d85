//! A multicast stream session with someone on the network who holds the keys: datagrams
//! made up by the fuzzer, tagged with the site key, the session key or the receiver's own
//! key (or not tagged at all), go to the sender or the receiver while the two run a real
//! session with each other and time passes.
//!
//! Input: records of one control byte (bits 0-1: tag with the site / session / receiver
//! key, or leave as is; bit 2: to the sender, else to the receiver; bit 3: the honest pair
//! exchange what they have queued first; bit 4: ten milliseconds pass first), one length
//! byte and the datagram without its tag. Nothing may panic, everything either side sends
//! decodes, and the receiver never writes a block outside the image it accepted.

#![no_main]

use fleetboot_stream::{
    BlockSink, BlockSource, MacKey, Manifest, Packet, Receiver, ReceiverConfig, Sender,
    SenderConfig, SigningKey,
};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

const SITE: [u8; 32] = [7; 32];
const SESSION: u32 = 9;
const SESSION_KEY: [u8; 16] = [9; 16];
const IMAGE: [u8; 16] = [1; 16];
const NONCE: u64 = 3;
const BLOCK: u16 = 1024;
const IMAGE_SIZE: u64 = 16 * 1024;
/// Larger announces are refused before any allocation (the receiver's bound).
const MAX_IMAGE: u64 = 1 << 20;

struct Image;
impl BlockSource for Image {
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        buf.iter_mut().enumerate().for_each(|(i, b)| *b = (index as usize + i) as u8);
        Ok(())
    }
}

/// Counts blocks written; refuses (and the target fails on) a block past `MAX_IMAGE`.
struct Sink {
    written: usize,
}
impl BlockSink for Sink {
    fn write_block(&mut self, index: u32, data: &[u8]) -> std::io::Result<()> {
        // Blocks are at least 64 bytes: no accepted image has more than this many.
        assert!(u64::from(index) < MAX_IMAGE / 64, "block {index} beyond any accepted image");
        assert!(data.len() <= 8192);
        self.written += 1;
        Ok(())
    }
    fn read_block(&mut self, index: u32, buf: &mut [u8]) -> std::io::Result<()> {
        Image.read_block(index, buf)
    }
}

fn sent_ok(buf: &[u8]) {
    assert!(Packet::decode(buf).is_ok(), "a peer sent a datagram that does not decode");
}

fuzz_target!(|input: &[u8]| {
    let t0 = Instant::now();
    let group = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(239, 1, 1, 1), 9000));
    let sender_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 9001));
    let rx_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 9002));
    let rcfg_key;
    let mut cfg = SenderConfig::new(SESSION, IMAGE, IMAGE_SIZE, BLOCK, SESSION_KEY, group);
    cfg.site_secret = SITE;
    // The sender's key: the fuzzer's datagrams are tagged with every shared key, but
    // cannot carry this key's signatures.
    // Hashed once per process, not per input.
    static MANIFEST: std::sync::OnceLock<std::sync::Arc<Manifest>> = std::sync::OnceLock::new();
    let manifest = MANIFEST.get_or_init(|| {
        Manifest::build(&mut Image, IMAGE_SIZE, BLOCK, SigningKey::from_bytes(&[5; 32])).expect("manifest")
    });
    rcfg_key = manifest.public_key();
    cfg.manifest = Some(manifest.clone());
    cfg.solicit.window = Duration::ZERO;
    cfg.max_receivers = 4;
    let Ok(mut snd) = Sender::new(t0, cfg) else { return };
    let mut rcfg = ReceiverConfig::new(IMAGE, NONCE);
    rcfg.site_secret = SITE;
    rcfg.sender_key = Some(rcfg_key);
    rcfg.max_image_size = MAX_IMAGE;
    let mut rx = Receiver::new(t0, rcfg);
    let site = MacKey::site(&SITE);
    let session = MacKey::session(&SESSION_KEY, SESSION);
    let mut sink = Sink { written: 0 };
    let mut now = t0;
    let mut buf = Vec::new();
    let mut rest = input;
    while let [control, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (msg, tail) = tail.split_at(len);
        rest = tail;
        if control & 0x10 != 0 {
            now += Duration::from_millis(10);
            snd.handle_timeout(now);
            rx.handle_timeout(now);
        }
        if control & 0x08 != 0 {
            buf.clear();
            let mut to_rx = Vec::new();
            while let Some(t) = snd.poll_transmit(now, &mut Image, &mut buf) {
                let d = &buf[buf.len() - t.size..];
                sent_ok(d);
                to_rx.push(d.to_vec());
            }
            to_rx.iter().for_each(|d| rx.handle(now, sender_addr, d));
            buf.clear();
            let mut to_snd = Vec::new();
            while let Some(t) = rx.poll_transmit(now, &mut buf) {
                let d = &buf[buf.len() - t.size..];
                sent_ok(d);
                to_snd.push(d.to_vec());
            }
            to_snd.iter().for_each(|d| snd.handle(now, rx_addr, d));
            let _ = rx.drain(now, &mut sink, 64);
        }
        let mut dgram = msg.to_vec();
        let key = match control & 3 {
            0 => Some(site.clone()),
            1 => Some(session.clone()),
            2 => rx.id().map(|id| MacKey::receiver(&session, id, NONCE)),
            _ => None,
        };
        if let Some(k) = key {
            let tag = k.tag(&dgram);
            dgram.extend_from_slice(&tag);
        }
        if control & 0x04 != 0 {
            snd.handle(now, rx_addr, &dgram);
        } else {
            rx.handle(now, sender_addr, &dgram);
        }
    }
});

//! One NBD session from the server's side: the client's bytes go through the handshake
//! and, once an export is chosen, through the transmission machine and the responder
//! against a small in-memory disk — the same path as `fleetboot_nbd::serve` and the
//! streaming agent's local disk, without sockets.
//!
//! The first input byte picks how the bytes arrive (in pieces of 1..=256 bytes, as TCP
//! may cut them); the rest is the client's stream. Whatever it holds, nothing may panic,
//! the machines may never claim bytes they were not given, and every reply must parse.

#![no_main]

use fleetboot_nbd::device::MemoryDisk;
use fleetboot_nbd::handshake::{ExportInfo, ExportLookup, Handshake, LookupError, Status, TlsPolicy};
use fleetboot_nbd::proto::{self, ReplyHeader};
use fleetboot_nbd::transmission::{Event, InputBuffer, Responder, Transmission};
use fleetboot_nbd::BlockDevice;
use libfuzzer_sys::fuzz_target;

const SIZE: usize = 256 << 10;

struct Lookup;

impl ExportLookup for Lookup {
    fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
        Ok(vec![("rw".into(), "a disk".into()), ("ro".into(), "read-only".into())])
    }
    fn lookup(&mut self, name: &str, _go: bool) -> Result<ExportInfo, LookupError> {
        match name {
            "rw" | "" | "ro" => Ok(ExportInfo {
                size: SIZE as u64,
                read_only: name == "ro",
                multi_conn: true,
                description: name.into(),
            }),
            _ => Err(LookupError::Unknown(name.into())),
        }
    }
}

/// Every reply the server wrote parses as a sequence of simple replies (a READ's data
/// after them is skipped by the caller's bookkeeping) or structured chunks.
fn check_reply(out: &[u8], structured: bool, simple_read: Option<usize>) {
    let mut at = 0;
    while at < out.len() {
        let (h, n) = ReplyHeader::parse(&out[at..])
            .expect("reply magic")
            .expect("whole reply header");
        at += n;
        match h {
            ReplyHeader::Simple(r) => {
                assert!(!structured || simple_read.is_none(), "simple reply to a structured READ");
                if r.error == 0 {
                    at += simple_read.unwrap_or(0);
                }
            }
            ReplyHeader::Chunk(c) => {
                assert!(structured, "chunk without structured replies");
                let payload = &out[at..at + c.len as usize];
                if c.kind == proto::chunk::ERROR {
                    proto::parse_error_chunk(payload).expect("error chunk");
                }
                if c.kind == proto::chunk::BLOCK_STATUS {
                    proto::parse_block_status(payload).expect("block status");
                }
                at += c.len as usize;
            }
        }
    }
    assert_eq!(at, out.len(), "reply bytes left over");
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = step as usize + 1;
    // TLS offered: after STARTTLS the fuzzer's bytes stand for what the TLS layer
    // decrypted, so the handshake inside TLS is explored too.
    let mut hs = Handshake::with_tls(TlsPolicy::Optional);
    let _ = hs.take_output();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    // Handshake.
    let session = loop {
        if fed < stream.len() {
            let k = step.min(stream.len() - fed);
            pending.extend_from_slice(&stream[fed..fed + k]);
            fed += k;
        } else if pending.is_empty() {
            return;
        }
        let (used, status) = hs.handle(&pending, &mut Lookup);
        assert!(used <= pending.len());
        pending.drain(..used);
        let _ = hs.take_output();
        match status {
            Status::Continue if fed == stream.len() && used == 0 => return,
            Status::Continue => {}
            Status::StartTls => hs.tls_established(),
            Status::Closed(_) => return,
            Status::Ready(n) => break n,
        }
    };
    // Transmission.
    let disk = MemoryDisk::new(SIZE, session.info.read_only);
    let mut machine = Transmission::new(&session, 4096);
    let replies = machine.replies();
    let Some(mut input) = InputBuffer::with_leftover(machine.input_capacity(), &pending) else {
        return;
    };
    let mut responder = Responder::new();
    loop {
        let (used, event) = machine.handle(input.data());
        assert!(used <= input.data().len());
        match event {
            None if used == 0 => {
                if fed == stream.len() {
                    return;
                }
                let spare = input.spare();
                assert!(!spare.is_empty(), "the machine stalled with a full buffer");
                let k = step.min(spare.len()).min(stream.len() - fed);
                spare[..k].copy_from_slice(&stream[fed..fed + k]);
                input.filled(k);
                fed += k;
                continue;
            }
            None => {}
            Some(Event::WriteData { offset, data, .. }) => {
                assert!(!data.is_empty());
                assert!(offset + data.len() as u64 <= disk.size());
                if let Err(e) = Responder::write_data(&disk, offset, data) {
                    machine.write_failed(e);
                }
            }
            Some(Event::Command { cookie, command }) => {
                let simple_read = match command {
                    fleetboot_nbd::transmission::Command::Read { len, .. } => Some(len as usize),
                    _ => None,
                };
                // A READ longer than one piece is sent piece by piece: the reply is all of
                // them together.
                let mut out = responder.execute(&disk, replies, cookie, command).to_vec();
                while responder.read_pending() {
                    match responder.continue_read(&disk) {
                        Ok(piece) => out.extend_from_slice(piece),
                        Err(_) => return,
                    }
                }
                check_reply(&out, session.structured, simple_read);
            }
            Some(Event::Reject { cookie, error, message, .. }) => {
                assert_ne!(error, 0);
                let out = responder.reject(replies, cookie, error, message);
                check_reply(out, session.structured, None);
            }
            Some(Event::Disconnect) | Some(Event::Close(_)) => return,
        }
        input.consume(used);
    }
});

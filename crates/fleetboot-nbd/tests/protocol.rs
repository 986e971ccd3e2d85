//! The server over loopback with a raw client: overlays, isolation, and malformed input
//! (bad magic, out-of-range offsets, oversized lengths, unknown options and commands,
//! garbage mid-stream). Nothing here may crash the server or touch another export.

mod common;

use common::*;
use fleetboot_nbd::proto::*;
use fleetboot_nbd::OverlayMode;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The connection is closed by the server (EOF or reset), not left hanging.
fn assert_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue, // replies sent before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

/// Another client still gets correct data: the server survived and nothing leaked.
fn assert_serving(f: &Fixture) {
    let mut c = RawClient::connect(f.addr, "img@0c-00-00-00-00-01");
    assert_eq!(c.read(0, 65536), image_bytes()[..65536].to_vec());
    c.disconnect();
    f.assert_image_unchanged();
}

#[test]
fn reads_writes_and_isolation_between_clients() {
    let f = Fixture::new(OverlayMode::Standard);
    let img = image_bytes();

    // Read-only export: the image, writes refused.
    let mut ro = RawClient::connect(f.addr, "img");
    assert_eq!(ro.size, IMAGE_SIZE as u64);
    assert_ne!(ro.flags & tflags::READ_ONLY, 0);
    assert_ne!(ro.flags & tflags::CAN_MULTI_CONN, 0);
    assert_eq!(ro.read(12345, 100_000), img[12345..112345].to_vec());
    assert_eq!(ro.write(0, &[1, 2, 3]), errno::EPERM);
    assert_eq!(
        ro.call(cmd::WRITE_ZEROES, 0, 0, 4096, &[]).error,
        errno::EPERM
    );
    assert_eq!(ro.call(cmd::TRIM, 0, 0, 4096, &[]).error, errno::EPERM);
    assert_eq!(ro.flush(), 0);

    // Client aa writes (unaligned, across blocks); bb and the shared image don't see it.
    let mut aa = RawClient::connect(f.addr, "img@aa-00-00-00-00-01");
    assert_eq!(aa.flags & tflags::READ_ONLY, 0);
    let patch = vec![0xAAu8; 200_000];
    assert_eq!(aa.write(70_001, &patch), 0);
    let mut expect = img.clone();
    expect[70_001..270_001].copy_from_slice(&patch);
    assert_eq!(aa.read(0, 400_000), expect[..400_000].to_vec());
    // A second connection of the same client shares the overlay (multi-conn is honest).
    let mut aa2 = RawClient::connect(f.addr, "img@AA:00:00:00:00:01");
    assert_eq!(aa2.read(60_000, 20_000), expect[60_000..80_000].to_vec());
    assert_eq!(aa2.write(1_000_000, &[7u8; 10]), 0);
    assert_eq!(aa2.flush(), 0);
    assert_eq!(aa.read(1_000_000, 10), vec![7u8; 10]);

    let mut bb = RawClient::connect(f.addr, "img@bb-00-00-00-00-02");
    assert_eq!(bb.read(0, 400_000), img[..400_000].to_vec());
    assert_eq!(ro.read(0, 400_000), img[..400_000].to_vec());

    // WRITE_ZEROES and TRIM.
    assert_eq!(aa.call(cmd::WRITE_ZEROES, 0, 3_000, 200_000, &[]).error, 0);
    expect[3_000..203_000].fill(0);
    assert_eq!(aa.read(0, 400_000), expect[..400_000].to_vec());
    assert_eq!(aa.call(cmd::TRIM, 0, 0, 1 << 20, &[]).error, 0);
    // After TRIM the contents are unspecified; the image still reads as before from bb.
    assert_eq!(bb.read(0, 1 << 20), img[..1 << 20].to_vec());

    // Block status: aa's overlay blocks are data; the image's holes are holes.
    let r = bb.call(cmd::BLOCK_STATUS, 0, 0, IMAGE_SIZE as u32, &[]);
    assert_eq!(r.error, 0);
    let h = state::HOLE | state::ZERO;
    assert_eq!(
        r.extents,
        vec![(3 << 20, 0), (3 << 20, h), (1 << 20, 0), (1 << 20, h)]
    );
    let r = aa.call(cmd::BLOCK_STATUS, cmdflags::REQ_ONE, 4 << 20, 1 << 20, &[]);
    assert_eq!(r.extents, vec![(1 << 20, h)]);
    assert_eq!(aa.call(cmd::WRITE, 0, 4 << 20, 3, &[1, 2, 3]).error, 0);
    let r = aa.call(cmd::BLOCK_STATUS, 0, 4 << 20, 1 << 20, &[]);
    assert_eq!(r.extents, vec![(65536, 0), ((1 << 20) - 65536, h)]);

    // Standard overlay: gone once all of aa's connections are closed (the server releases
    // it before it closes a connection, so no waiting is needed).
    aa.disconnect();
    aa2.disconnect();
    assert!(f
        .exports
        .live_overlays()
        .iter()
        .all(|o| o.1 != "aa-00-00-00-00-01"));
    let mut aa = RawClient::connect(f.addr, "img@aa-00-00-00-00-01");
    assert_eq!(aa.read(0, 400_000), img[..400_000].to_vec());
    aa.disconnect();
    bb.disconnect();
    ro.disconnect();
    f.assert_image_unchanged();
    // No standard overlay left on disk.
    let left: Vec<_> = std::fs::read_dir(f.dir.path().join("overlays/standard"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn private_overlay_survives_reconnect() {
    let f = Fixture::new(OverlayMode::Private);
    let mut a = RawClient::connect(f.addr, "img@52-54-00-77-00-10");
    assert_eq!(a.write(5, b"hello private"), 0);
    a.disconnect();
    assert!(f.exports.live_overlays().is_empty(), "released and closed");
    let mut a = RawClient::connect(f.addr, "img@52-54-00-77-00-10");
    assert_eq!(a.read(5, 13), b"hello private".to_vec());
    let mut other = RawClient::connect(f.addr, "img@52-54-00-77-00-11");
    assert_eq!(other.read(5, 13), image_bytes()[5..18].to_vec());
    // Discarding is refused while the client is connected, allowed after.
    assert!(f
        .exports
        .discard_private("img", "52-54-00-77-00-10")
        .is_err());
    a.disconnect();
    other.disconnect();
    assert!(f
        .exports
        .discard_private("img", "52-54-00-77-00-10")
        .unwrap());
    let mut a = RawClient::connect(f.addr, "img@52-54-00-77-00-10");
    assert_eq!(a.read(5, 13), image_bytes()[5..18].to_vec());
    f.assert_image_unchanged();
}

#[test]
fn simple_replies_without_the_structured_reply_option() {
    let f = Fixture::new(OverlayMode::Standard);
    let mut c = RawClient::try_connect(f.addr, "img@dd-00-00-00-00-01", false).unwrap();
    assert_eq!(c.flags & tflags::SEND_DF, 0);
    assert_eq!(c.read(100, 1000), image_bytes()[100..1100].to_vec());
    // BLOCK_STATUS without a metadata context is refused.
    assert_eq!(
        c.call(cmd::BLOCK_STATUS, 0, 0, 4096, &[]).error,
        errno::EINVAL
    );
    // NBD_OPT_EXPORT_NAME (the old way in) works too.
    let mut s = RawClient::start(f.addr);
    let mut b = Vec::new();
    NbdOption::ExportName("img".into()).encode(&mut b);
    s.write_all(&b).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(
        u64::from_be_bytes(r[..8].try_into().unwrap()),
        IMAGE_SIZE as u64
    );
}

#[test]
fn malformed_handshake() {
    let f = Fixture::new(OverlayMode::Standard);

    // Unknown client flags: closed.
    let mut s = TcpStream::connect(f.addr).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert_closed(&mut s);

    // Bad option magic: closed.
    let mut s = RawClient::start(f.addr);
    s.write_all(b"GARBAGE!GARBAGE!GARBAGE!").unwrap();
    assert_closed(&mut s);

    // Unknown options → ERR_UNSUP; unknown exports → ERR_UNKNOWN; a bad GO payload →
    // ERR_INVALID; an oversized option → ERR_TOO_BIG; and the session still completes.
    let mut s = RawClient::start(f.addr);
    for o in [opt::STARTTLS, opt::EXTENDED_HEADERS, 4, 99, 0xdead_beef] {
        let r = RawClient::option(
            &mut s,
            &NbdOption::Other {
                option: o,
                data: vec![0; 7],
            },
        );
        assert_eq!(r[0].reply, rep::ERR_UNSUP, "option {o}");
    }
    for name in [
        "nope",
        "img:7",
        "img@zz",
        "img@aa-00-00-00-00-01-02",
        "../etc/passwd",
        "",
    ] {
        let r = RawClient::option(
            &mut s,
            &NbdOption::Go(InfoRequest {
                name: name.into(),
                requests: vec![],
            }),
        );
        assert_eq!(r[0].reply, rep::ERR_UNKNOWN, "{name:?}");
    }
    let mut b = Vec::new();
    OptionHeader {
        option: opt::GO,
        len: 5,
    }
    .encode(&mut b);
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0]);
    s.write_all(&b).unwrap();
    assert_eq!(RawClient::read_replies(&mut s)[0].reply, rep::ERR_INVALID);
    let mut b = Vec::new();
    OptionHeader {
        option: opt::INFO,
        len: 1 << 20,
    }
    .encode(&mut b);
    b.resize(b.len() + (1 << 20), 0x41);
    s.write_all(&b).unwrap();
    assert_eq!(RawClient::read_replies(&mut s)[0].reply, rep::ERR_TOO_BIG);
    let r = RawClient::option(&mut s, &NbdOption::List);
    let names: Vec<String> = r
        .iter()
        .filter(|r| r.reply == rep::SERVER)
        .map(|r| {
            String::from_utf8_lossy(
                &r.data[4..4 + u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize],
            )
            .into_owned()
        })
        .collect();
    assert_eq!(names, vec!["img", "img:1"]);
    let r = RawClient::option(
        &mut s,
        &NbdOption::Info(InfoRequest {
            name: "img".into(),
            requests: vec![info::BLOCK_SIZE],
        }),
    );
    assert_eq!(
        r.iter().map(|r| r.reply).collect::<Vec<_>>(),
        vec![rep::INFO, rep::INFO, rep::ACK]
    );
    let r = RawClient::option(
        &mut s,
        &NbdOption::ListMetaContext(MetaRequest {
            name: "img".into(),
            queries: vec![],
        }),
    );
    assert_eq!(r[0].reply, rep::ERR_INVALID, "structured replies first");
    RawClient::option(&mut s, &NbdOption::StructuredReply);
    let r = RawClient::option(
        &mut s,
        &NbdOption::ListMetaContext(MetaRequest {
            name: "img".into(),
            queries: vec![],
        }),
    );
    assert_eq!(
        (r[0].reply, &r[0].data[4..]),
        (rep::META_CONTEXT, BASE_ALLOCATION.as_bytes())
    );
    assert_eq!(
        RawClient::option(&mut s, &NbdOption::Abort)[0].reply,
        rep::ACK
    );
    assert_closed(&mut s);

    // A client that goes silent mid-option, then drops.
    let mut s = RawClient::start(f.addr);
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);

    assert_serving(&f);
}

#[test]
fn malformed_requests() {
    let f = Fixture::new(OverlayMode::Standard);
    let size = IMAGE_SIZE as u64;
    let mut victim = RawClient::connect(f.addr, "img@0b-00-00-00-00-01");
    assert_eq!(victim.write(0, b"victim data"), 0);

    let mut c = RawClient::connect(f.addr, "img@0a-00-00-00-00-01");
    // Out of range and overflowing offsets.
    assert_eq!(c.call(cmd::READ, 0, size, 1, &[]).error, errno::EINVAL);
    assert_eq!(
        c.call(cmd::READ, 0, size - 10, 11, &[]).error,
        errno::EINVAL
    );
    assert_eq!(
        c.call(cmd::READ, 0, u64::MAX - 5, 100, &[]).error,
        errno::EINVAL
    );
    assert_eq!(
        c.call(cmd::WRITE, 0, size - 2, 4, &[1, 2, 3, 4]).error,
        errno::ENOSPC
    );
    assert_eq!(
        c.call(cmd::WRITE_ZEROES, 0, u64::MAX, 4, &[]).error,
        errno::ENOSPC
    );
    assert_eq!(c.call(cmd::TRIM, 0, size, 4096, &[]).error, errno::EINVAL);
    assert_eq!(
        c.call(cmd::BLOCK_STATUS, 0, size - 1, 2, &[]).error,
        errno::EINVAL
    );
    // Oversized read (EOVERFLOW when one chunk was asked for); unknown command; unknown
    // flags and flags of other commands.
    assert_eq!(
        c.call(cmd::READ, 0, 0, MAX_REQUEST_LEN + 1, &[]).error,
        errno::EINVAL
    );
    assert_eq!(
        c.call(cmd::READ, cmdflags::DF, 0, MAX_REQUEST_LEN + 1, &[]).error,
        errno::EOVERFLOW
    );
    assert_eq!(c.call(99, 0, 0, 0, &[]).error, errno::EINVAL);
    assert_eq!(c.call(cmd::READ, 0x8000, 0, 10, &[]).error, errno::EINVAL);
    assert_eq!(c.call(cmd::READ, cmdflags::NO_HOLE, 0, 10, &[]).error, errno::EINVAL);
    assert_eq!(c.call(cmd::FLUSH, cmdflags::REQ_ONE, 0, 0, &[]).error, errno::EINVAL);
    // A WRITE refused for its flags: its payload is skipped and the connection goes on.
    assert_eq!(
        c.call(cmd::WRITE, cmdflags::DF, 0, 6, b"skip!!").error,
        errno::EINVAL
    );
    assert_eq!(c.read(0, 6), image_bytes()[..6].to_vec());
    // The flags that apply are honoured: DF and FUA on READ, CACHE, fast zeroing (refused
    // when it would have to write zeros), FUA on WRITE.
    assert_eq!(c.call(cmd::READ, cmdflags::DF | cmdflags::FUA, 0, 10, &[]).error, 0);
    assert_eq!(c.call(cmd::CACHE, 0, 0, 1 << 20, &[]).error, 0);
    let mib = 1 << 20;
    assert_eq!(c.call(cmd::WRITE_ZEROES, cmdflags::FAST_ZERO, mib, 65536, &[]).error, 0);
    assert_eq!(
        c.call(cmd::WRITE_ZEROES, cmdflags::FAST_ZERO | cmdflags::NO_HOLE, mib, 65536, &[]).error,
        errno::ENOTSUP
    );
    assert_eq!(c.call(cmd::WRITE, cmdflags::FUA, mib, 3, b"fua").error, 0);
    let mut want = b"fua".to_vec();
    want.resize(65536, 0);
    assert_eq!(c.read(mib, 65536), want);
    // Zero-length requests are harmless.
    assert!(c.read(0, 0).is_empty());
    assert_eq!(c.write(0, &[]), 0);
    // The connection is still good.
    assert_eq!(c.read(0, 16), image_bytes()[..16].to_vec());
    // An oversized WRITE: an error, then the server closes (it will not read 64 MiB).
    c.send(cmd::WRITE, 0, 0, 64 << 20, &[]);
    let (_, r) = c.recv().unwrap();
    assert_eq!(r.error, errno::EINVAL);
    assert_closed(&mut c.sock);

    // Garbage mid-stream: closed.
    let mut c = RawClient::connect(f.addr, "img@0a-00-00-00-00-01");
    assert_eq!(c.write(0, b"doomed"), 0);
    c.sock.write_all(&[0x42; 64]).unwrap();
    assert_closed(&mut c.sock);
    // A WRITE cut short by a disconnect.
    let mut c = RawClient::connect(f.addr, "img@0a-00-00-00-00-01");
    c.sock
        .write_all(
            &Request {
                flags: 0,
                command: cmd::WRITE,
                cookie: 1,
                offset: 0,
                len: 1000,
            }
            .encode(),
        )
        .unwrap();
    c.sock.write_all(&[1; 10]).unwrap();
    drop(c);

    // The other client's overlay is untouched and the server still serves.
    assert_eq!(victim.read(0, 11), b"victim data".to_vec());
    assert_eq!(victim.read(11, 1000), image_bytes()[11..1011].to_vec());
    victim.disconnect();
    assert_serving(&f);
}

#[test]
fn many_clients_at_once() {
    let f = Fixture::new(OverlayMode::Standard);
    let img = image_bytes();
    let threads: Vec<_> = (0..16u8)
        .map(|i| {
            let addr = f.addr;
            let img = img.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(addr, &format!("img@02-00-00-00-00-{i:02x}"));
                let data = vec![i; 100_000];
                let off = i as u64 * 300_000 + 17;
                assert_eq!(c.write(off, &data), 0);
                for k in 0..20u64 {
                    let o = (k * 397_000) % (IMAGE_SIZE as u64 - 200_000);
                    let got = c.read(o, 200_000);
                    let mut want = img[o as usize..o as usize + 200_000].to_vec();
                    for (j, w) in want.iter_mut().enumerate() {
                        let p = o + j as u64;
                        if p >= off && p < off + 100_000 {
                            *w = i;
                        }
                    }
                    assert_eq!(got, want, "client {i} read at {o}");
                }
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    f.assert_image_unchanged();
}

#[test]
fn random_bytes_never_hurt_the_server() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let f = Fixture::new(OverlayMode::Standard);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let strategy = (0u8..3, proptest::collection::vec(any::<u8>(), 0..2000));
    runner
        .run(&strategy, |(stage, garbage)| {
            // Garbage from the start, after the client flags, or in transmission (after a
            // valid request header, so payload and headers are both hit).
            let mut s = match stage {
                0 => TcpStream::connect(f.addr).unwrap(),
                1 => RawClient::start(f.addr),
                _ => {
                    let mut c = RawClient::connect(f.addr, "img@0d-00-00-00-00-01");
                    c.send(cmd::READ, 0, 0, 512, &[]);
                    c.sock
                }
            };
            let _ = s.write_all(&garbage);
            let _ = s.shutdown(std::net::Shutdown::Write);
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut sink = Vec::new();
            // The server must close (EOF or reset), not hang.
            match s.read_to_end(&mut sink) {
                Ok(_) => {}
                Err(e) => prop_assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            }
            Ok(())
        })
        .unwrap();
    assert_serving(&f);
}

use super::*;
use crate::device::MemoryDisk;
use crate::handshake::ExportInfo;
use crate::proto::{state, ReplyHeader, Request};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

fn session(read_only: bool, structured: bool) -> Session {
    let mut flags = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_CACHE
        | tflags::CAN_MULTI_CONN;
    if read_only {
        flags |= tflags::READ_ONLY;
    } else {
        flags |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
    }
    if structured {
        flags |= tflags::SEND_DF;
    }
    Session {
        export: "disk".into(),
        info: ExportInfo {
            size: SIZE,
            read_only,
            multi_conn: true,
            description: String::new(),
        },
        flags,
        structured,
        base_allocation: structured.then_some(1),
    }
}

fn req(command: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        command,
        cookie: 0x1234,
        offset,
        len,
    }
}

/// The first event for one request header (no payload).
fn first(t: &mut Transmission, r: Request) -> Event<'static> {
    let b: &'static [u8] = Box::leak(Box::new(r.encode()));
    let (n, ev) = t.handle(b);
    assert!(n <= b.len());
    ev.unwrap_or_else(|| panic!("no event for {r:?}"))
}

fn rejected(t: &mut Transmission, r: Request) -> u32 {
    match first(t, r) {
        Event::Reject { error, cookie, .. } => {
            assert_eq!(cookie, r.cookie);
            error
        }
        ev => panic!("{r:?} was not refused: {ev:?}"),
    }
}

fn accepted(t: &mut Transmission, r: Request) -> Command {
    match first(t, r) {
        Event::Command { command, .. } => command,
        ev => panic!("{r:?} was not accepted: {ev:?}"),
    }
}

#[test]
fn flags_are_checked_per_command() {
    let mut t = Transmission::new(&session(false, true), 4096);
    // FUA is valid on every command once advertised (clients set it on reads too).
    assert!(matches!(
        accepted(&mut t, req(cmd::READ, cmdflags::FUA, 0, 10)),
        Command::Read { .. }
    ));
    assert_eq!(
        accepted(&mut t, req(cmd::READ, cmdflags::DF, 0, 10)),
        Command::Read { offset: 0, len: 10, df: true }
    );
    assert_eq!(
        accepted(&mut t, req(cmd::FLUSH, cmdflags::FUA, 0, 0)),
        Command::Flush
    );
    assert_eq!(
        accepted(
            &mut t,
            req(cmd::WRITE_ZEROES, cmdflags::NO_HOLE | cmdflags::FAST_ZERO | cmdflags::FUA, 4096, 8192)
        ),
        Command::WriteZeroes {
            offset: 4096,
            len: 8192,
            fua: true,
            mode: ZeroMode {
                may_trim: false,
                fast: true
            }
        }
    );
    assert_eq!(
        accepted(&mut t, req(cmd::BLOCK_STATUS, cmdflags::REQ_ONE, 0, 512)),
        Command::BlockStatus {
            offset: 0,
            len: 512,
            one: true,
            context: 1
        }
    );
    assert_eq!(
        accepted(&mut t, req(cmd::CACHE, 0, 0, 1 << 16)),
        Command::Cache {
            offset: 0,
            len: 1 << 16
        }
    );
    // Flags documented for other commands, and undefined flags.
    for (c, f) in [
        (cmd::READ, cmdflags::NO_HOLE),
        (cmd::READ, cmdflags::REQ_ONE),
        (cmd::READ, cmdflags::FAST_ZERO),
        (cmd::READ, cmdflags::PAYLOAD_LEN),
        (cmd::READ, 0x8000),
        (cmd::FLUSH, cmdflags::DF),
        (cmd::TRIM, cmdflags::NO_HOLE),
        (cmd::BLOCK_STATUS, cmdflags::DF),
        (cmd::WRITE_ZEROES, cmdflags::REQ_ONE),
        (cmd::CACHE, cmdflags::DF),
        (cmd::DISC, 0x40),
    ] {
        assert_eq!(rejected(&mut t, req(c, f, 0, 4096)), errno::EINVAL, "cmd {c} flags {f:#x}");
    }
    // Unknown commands.
    for c in [8u16, 99, 0xffff] {
        assert_eq!(rejected(&mut t, req(c, 0, 0, 0)), errno::EINVAL);
    }
    assert_eq!(first(&mut t, req(cmd::DISC, 0, 0, 0)), Event::Disconnect);
}

#[test]
fn flags_depend_on_what_the_handshake_agreed() {
    // Without structured replies: no DF, no BLOCK_STATUS.
    let mut t = Transmission::new(&session(false, false), 4096);
    assert_eq!(rejected(&mut t, req(cmd::READ, cmdflags::DF, 0, 10)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::BLOCK_STATUS, 0, 0, 10)), errno::EINVAL);
    // Without FAST_ZERO advertised, the flag is refused.
    let mut s = session(false, true);
    s.flags &= !tflags::SEND_FAST_ZERO;
    let mut t = Transmission::new(&s, 4096);
    assert_eq!(
        rejected(&mut t, req(cmd::WRITE_ZEROES, cmdflags::FAST_ZERO, 0, 10)),
        errno::EINVAL
    );
    // Without CACHE or FLUSH advertised.
    s.flags &= !(tflags::SEND_CACHE | tflags::SEND_FLUSH | tflags::SEND_FUA);
    let mut t = Transmission::new(&s, 4096);
    assert_eq!(rejected(&mut t, req(cmd::CACHE, 0, 0, 10)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::FLUSH, 0, 0, 0)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::READ, cmdflags::FUA, 0, 10)), errno::EINVAL);
}

#[test]
fn ranges_and_read_only_get_their_errors() {
    let mut t = Transmission::new(&session(false, true), 4096);
    assert_eq!(rejected(&mut t, req(cmd::READ, 0, SIZE, 1)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::READ, 0, u64::MAX - 3, 10)), errno::EINVAL);
    assert_eq!(
        rejected(&mut t, req(cmd::READ, 0, 0, MAX_REQUEST_LEN + 1)),
        errno::EINVAL
    );
    assert_eq!(
        rejected(&mut t, req(cmd::READ, cmdflags::DF, 0, MAX_REQUEST_LEN + 1)),
        errno::EOVERFLOW
    );
    assert_eq!(rejected(&mut t, req(cmd::WRITE_ZEROES, 0, SIZE - 1, 2)), errno::ENOSPC);
    assert_eq!(rejected(&mut t, req(cmd::TRIM, 0, SIZE, 1)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::CACHE, 0, SIZE, 1)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::BLOCK_STATUS, 0, 0, 0)), errno::EINVAL);
    assert_eq!(rejected(&mut t, req(cmd::BLOCK_STATUS, 0, SIZE - 1, 2)), errno::EINVAL);
    // Long zeroing and trimming are fine (no payload).
    assert!(matches!(
        accepted(&mut t, req(cmd::TRIM, 0, 0, SIZE as u32)),
        Command::Trim { .. }
    ));

    let mut ro = Transmission::new(&session(true, true), 4096);
    for c in [cmd::WRITE_ZEROES, cmd::TRIM] {
        assert_eq!(rejected(&mut ro, req(c, 0, 0, 4096)), errno::EPERM);
    }
    assert!(matches!(
        accepted(&mut ro, req(cmd::READ, 0, 0, 4096)),
        Command::Read { .. }
    ));
    // A refused WRITE's payload is consumed and dropped; the next request is read.
    let mut b = req(cmd::WRITE, 0, 0, 5000).encode().to_vec();
    b.extend_from_slice(&[7u8; 5000]);
    b.extend_from_slice(&req(cmd::FLUSH, 0, 0, 0).encode());
    let events = drive(&mut ro, &b, 1000);
    assert_eq!(
        events,
        vec![
            Ev::Reject(cmd::WRITE, errno::EPERM),
            Ev::Command(Command::Flush)
        ]
    );
}

#[test]
fn an_oversized_write_is_refused_then_the_connection_closes() {
    let mut t = Transmission::new(&session(false, true), 4096);
    let b = req(cmd::WRITE, 0, 0, MAX_REQUEST_LEN + 1).encode();
    let (n, ev) = t.handle(&b);
    assert_eq!(n, Request::SIZE);
    assert!(matches!(
        ev,
        Some(Event::Reject {
            error: errno::EINVAL,
            ..
        })
    ));
    assert_eq!(
        t.handle(&[0; 100]),
        (
            0,
            Some(Event::Close(TransmissionError::WriteTooLong {
                len: MAX_REQUEST_LEN + 1,
                max: MAX_REQUEST_LEN
            }))
        )
    );
    // Bad magic: closed at once, and for good.
    let mut t = Transmission::new(&session(false, true), 4096);
    let (n, ev) = t.handle(&[0x42; 28]);
    assert_eq!(n, 0);
    assert!(matches!(
        ev,
        Some(Event::Close(TransmissionError::Protocol(
            proto::ProtoError::BadMagic { .. }
        )))
    ));
    assert!(matches!(t.handle(&req(cmd::READ, 0, 0, 1).encode()).1, Some(Event::Close(_))));
}

#[test]
fn a_failed_write_drops_its_payload_and_reports_the_error() {
    let mut t = Transmission::new(&session(false, true), 4096);
    let mut b = req(cmd::WRITE, 0, 100, 10_000).encode().to_vec();
    b.extend_from_slice(&[1u8; 10_000]);
    let (n, ev) = t.handle(&b);
    assert_eq!((n, ev), (Request::SIZE, None));
    // A piece that is not the last ends on a block boundary.
    let (n2, ev) = t.handle(&b[n..n + 5000]);
    assert_eq!(n2, 4096 - 100);
    assert!(matches!(ev, Some(Event::WriteData { offset: 100, .. })));
    t.write_failed(errno::ENOSPC);
    let (n3, ev) = t.handle(&b[n + n2..]);
    assert_eq!((n + n2 + n3, ev), (b.len(), None));
    assert!(matches!(
        t.handle(&[]).1,
        Some(Event::Reject {
            error: errno::ENOSPC,
            command: cmd::WRITE,
            ..
        })
    ));
    assert_eq!(t.handle(&[]), (0, None));
}

/// Events with their borrowed data copied out, for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Command(Command),
    Data(u64, Vec<u8>),
    Reject(u16, u32),
    Disconnect,
    Close,
}

/// Feeds `input` in pieces of at most `step` bytes through an input buffer of `cap`
/// bytes, as a shell would, and collects the events (WRITE pieces merged).
fn drive(t: &mut Transmission, input: &[u8], step: usize) -> Vec<Ev> {
    drive_cap(t, input, step, t.min_input() * 2)
}

fn drive_cap(t: &mut Transmission, input: &[u8], step: usize, cap: usize) -> Vec<Ev> {
    let mut buf = InputBuffer::new(cap);
    let mut fed = 0;
    let mut out: Vec<Ev> = Vec::new();
    loop {
        let (n, ev) = t.handle(buf.data());
        assert!(n <= buf.data().len());
        let waiting = n == 0 && ev.is_none();
        let stop = match ev {
            Some(Event::Command { command, .. }) => {
                out.push(Ev::Command(command));
                false
            }
            Some(Event::WriteData { offset, data, .. }) => {
                assert!(!data.is_empty());
                match out.last_mut() {
                    Some(Ev::Data(o, d)) if *o + d.len() as u64 == offset => {
                        d.extend_from_slice(data)
                    }
                    _ => out.push(Ev::Data(offset, data.to_vec())),
                }
                false
            }
            Some(Event::Reject { command, error, .. }) => {
                out.push(Ev::Reject(command, error));
                false
            }
            Some(Event::Disconnect) => {
                out.push(Ev::Disconnect);
                false
            }
            Some(Event::Close(_)) => {
                out.push(Ev::Close);
                true
            }
            None => false,
        };
        buf.consume(n);
        if stop {
            return out;
        }
        if waiting {
            if fed == input.len() {
                return out;
            }
            let spare = buf.spare();
            assert!(!spare.is_empty(), "the machine stalled with a full buffer");
            let k = spare.len().min(step).min(input.len() - fed);
            spare[..k].copy_from_slice(&input[fed..fed + k]);
            buf.filled(k);
            fed += k;
        }
    }
}

/// A request a well-behaved client may send, with its payload.
#[derive(Debug, Clone)]
struct ClientRequest {
    header: Request,
    payload: Vec<u8>,
}

fn client_request(size: u64) -> impl Strategy<Value = ClientRequest> {
    let range = (0..size, 0u32..70_000).prop_map(move |(o, l)| {
        let l = (l as u64).min(size - o) as u32;
        (o, l)
    });
    prop_oneof![
        (range.clone(), any::<bool>()).prop_map(|((o, l), df)| (cmd::READ, if df { cmdflags::DF } else { 0 }, o, l, false)),
        (range.clone(), any::<bool>()).prop_map(|((o, l), fua)| (cmd::WRITE, if fua { cmdflags::FUA } else { 0 }, o, l, true)),
        Just((cmd::FLUSH, 0, 0, 0, false)),
        range.clone().prop_map(|(o, l)| (cmd::TRIM, 0, o, l, false)),
        (range.clone(), 0u16..4).prop_map(|((o, l), f)| (cmd::WRITE_ZEROES, ((f & 1) * cmdflags::NO_HOLE) | ((f >> 1) * cmdflags::FAST_ZERO), o, l, false)),
        (range.clone(), any::<bool>()).prop_map(move |((o, l), one)| (cmd::BLOCK_STATUS, if one { cmdflags::REQ_ONE } else { 0 }, o, l.max(1).min((size - o) as u32), false)),
        range.prop_map(|(o, l)| (cmd::CACHE, 0, o, l, false)),
    ]
    .prop_flat_map(|(command, flags, offset, len, payload)| {
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), if payload { len as usize } else { 0 }),
        )
            .prop_map(move |(cookie, payload)| ClientRequest {
                header: Request {
                    flags,
                    command,
                    cookie,
                    offset,
                    len,
                },
                payload,
            })
    })
}

/// What the machine must make of a valid request.
fn expected(r: &ClientRequest) -> Vec<Ev> {
    let h = &r.header;
    let fua = h.flags & cmdflags::FUA != 0;
    let c = match h.command {
        cmd::READ => Command::Read {
            offset: h.offset,
            len: h.len,
            df: h.flags & cmdflags::DF != 0,
        },
        cmd::WRITE => {
            let mut v = Vec::new();
            if h.len > 0 {
                v.push(Ev::Data(h.offset, r.payload.clone()));
            }
            v.push(Ev::Command(Command::Write {
                offset: h.offset,
                len: h.len,
                fua,
            }));
            return v;
        }
        cmd::FLUSH => Command::Flush,
        cmd::TRIM => Command::Trim {
            offset: h.offset,
            len: h.len,
            fua,
        },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset: h.offset,
            len: h.len,
            fua,
            mode: ZeroMode {
                may_trim: h.flags & cmdflags::NO_HOLE == 0,
                fast: h.flags & cmdflags::FAST_ZERO != 0,
            },
        },
        cmd::BLOCK_STATUS => Command::BlockStatus {
            offset: h.offset,
            len: h.len,
            one: h.flags & cmdflags::REQ_ONE != 0,
            context: 1,
        },
        cmd::CACHE => Command::Cache {
            offset: h.offset,
            len: h.len,
        },
        _ => unreachable!(),
    };
    vec![Ev::Command(c)]
}

/// One reply as a client sees it.
#[derive(Debug, PartialEq, Eq)]
struct ParsedReply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    extents: Vec<(u32, u32)>,
}

/// Parses one whole reply from `b` (the caller says how many data bytes a simple reply
/// to a READ carries): the reply and the bytes it used.
fn parse_reply(b: &[u8], simple_read_len: Option<u32>) -> (ParsedReply, usize) {
    let mut used = 0;
    let mut r = ParsedReply {
        cookie: 0,
        error: 0,
        data: Vec::new(),
        extents: Vec::new(),
    };
    loop {
        let (h, n) = ReplyHeader::parse(&b[used..]).unwrap().expect("whole reply");
        used += n;
        r.cookie = h.cookie();
        match h {
            ReplyHeader::Simple(s) => {
                r.error = s.error;
                if s.error == 0 {
                    if let Some(len) = simple_read_len {
                        r.data = b[used..used + len as usize].to_vec();
                        used += len as usize;
                    }
                }
                return (r, used);
            }
            ReplyHeader::Chunk(c) => {
                let p = &b[used..used + c.len as usize];
                used += c.len as usize;
                match c.kind {
                    chunk::OFFSET_DATA => r.data.extend_from_slice(&p[8..]),
                    chunk::BLOCK_STATUS => r.extents = proto::parse_block_status(p).unwrap().1,
                    chunk::ERROR | chunk::ERROR_OFFSET => r.error = proto::parse_error_chunk(p).unwrap().0,
                    chunk::NONE => assert!(p.is_empty()),
                    k => panic!("chunk type {k}"),
                }
                if c.flags & chunk::FLAG_DONE != 0 {
                    return (r, used);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Arbitrary bytes, in arbitrary pieces, never panic the machine, never make it claim
    /// more bytes than it was given, and never stall it with a full buffer.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4000), step in 1usize..300, structured in any::<bool>(), ro in any::<bool>(), align in prop_oneof![Just(512u32), Just(4096), Just(65536)]) {
        let mut t = Transmission::new(&session(ro, structured), align);
        let _ = drive(&mut t, &bytes, step);
    }

    /// Valid headers with random flags, commands and ranges: every one is either accepted
    /// as the command it encodes or refused with an error value NBD defines, and the
    /// cookie always comes back.
    #[test]
    fn every_header_gets_an_answer(flags in any::<u16>(), command in 0u16..10, offset in prop_oneof![0..SIZE + 10, any::<u64>()], len in prop_oneof![0u32..70_000, any::<u32>()], structured in any::<bool>(), ro in any::<bool>()) {
        let mut t = Transmission::new(&session(ro, structured), 4096);
        let r = Request { flags, command, cookie: 77, offset, len };
        let b = r.encode();
        let (n, ev) = t.handle(&b);
        prop_assert_eq!(n, Request::SIZE);
        match ev {
            Some(Event::Reject { cookie, error, .. }) => {
                prop_assert_eq!(cookie, 77);
                prop_assert!([errno::EPERM, errno::EINVAL, errno::ENOSPC, errno::EOVERFLOW].contains(&error));
            }
            Some(Event::Command { cookie, .. }) => prop_assert_eq!(cookie, 77),
            Some(Event::Disconnect) => prop_assert_eq!(command, cmd::DISC),
            None => prop_assert!(command == cmd::WRITE && len > 0),
            Some(ev) => prop_assert!(false, "unexpected {:?}", ev),
        }
    }

    /// A stream of valid requests, cut anywhere, comes out as exactly those commands, and
    /// each WRITE's payload as exactly its bytes, in pieces that end on block boundaries.
    #[test]
    fn encoded_requests_parse_back(reqs in proptest::collection::vec(client_request(SIZE), 1..12), step in 1usize..9000, align in prop_oneof![Just(512u32), Just(4096), Just(65536)]) {
        let mut t = Transmission::new(&session(false, true), align);
        let mut input = Vec::new();
        let mut want = Vec::new();
        for r in &reqs {
            input.extend_from_slice(&r.header.encode());
            input.extend_from_slice(&r.payload);
            want.extend(expected(r));
        }
        input.extend_from_slice(&req(cmd::DISC, 0, 0, 0).encode());
        want.push(Ev::Disconnect);
        let got = drive(&mut t, &input, step);
        prop_assert_eq!(got, want);
    }

    /// The machine, the responder and a memory disk together behave like the disk: what a
    /// client writes it reads back, zeroed ranges read as zeros, and every reply parses
    /// with the request's cookie.
    #[test]
    fn responder_replies_parse_and_match_a_model(reqs in proptest::collection::vec(client_request(SIZE), 1..16), structured in any::<bool>()) {
        let disk = MemoryDisk::new(SIZE as usize, false);
        let mut model = vec![0u8; SIZE as usize];
        let mut t = Transmission::new(&session(false, structured), 4096);
        let replies = t.replies();
        let mut responder = Responder::new();
        for r in &reqs {
            let mut h = r.header;
            if !structured {
                // DF and BLOCK_STATUS need structured replies.
                h.flags &= !cmdflags::DF;
                if h.command == cmd::BLOCK_STATUS { h.command = cmd::CACHE; h.flags = 0; }
            }
            let mut input = h.encode().to_vec();
            input.extend_from_slice(&r.payload);
            let mut at = 0;
            let mut out = Vec::new();
            loop {
                let (n, ev) = t.handle(&input[at..]);
                match ev {
                    Some(Event::WriteData { offset, data, .. }) => {
                        if let Err(e) = Responder::write_data(&disk, offset, data) { t.write_failed(e); }
                    }
                    Some(Event::Command { cookie, command }) => {
                        out.extend_from_slice(responder.execute(&disk, replies, cookie, command));
                        while responder.read_pending() {
                            out.extend_from_slice(responder.continue_read(&disk).unwrap());
                        }
                        at += n;
                        break;
                    }
                    Some(Event::Reject { cookie, error, message, .. }) => {
                        out.extend_from_slice(responder.reject(replies, cookie, error, message));
                        at += n;
                        break;
                    }
                    None => {}
                    ev => prop_assert!(false, "{:?}", ev),
                }
                at += n;
            }
            prop_assert_eq!(at, input.len());
            let simple_len = (h.command == cmd::READ && !structured).then_some(h.len);
            let (reply, used) = parse_reply(&out, simple_len);
            prop_assert_eq!(used, out.len(), "one reply per request");
            prop_assert_eq!(reply.cookie, h.cookie);
            let (o, l) = (h.offset as usize, h.len as usize);
            match h.command {
                cmd::READ => {
                    prop_assert_eq!(reply.error, 0);
                    prop_assert_eq!(&reply.data[..], &model[o..o + l]);
                }
                cmd::WRITE => {
                    prop_assert_eq!(reply.error, 0);
                    model[o..o + l].copy_from_slice(&r.payload);
                }
                cmd::WRITE_ZEROES if h.flags & cmdflags::FAST_ZERO != 0 && h.flags & cmdflags::NO_HOLE != 0 => {
                    prop_assert_eq!(reply.error, errno::ENOTSUP, "a slow fast zero is refused");
                }
                cmd::WRITE_ZEROES => {
                    prop_assert_eq!(reply.error, 0);
                    model[o..o + l].fill(0);
                }
                cmd::BLOCK_STATUS => {
                    prop_assert_eq!(reply.error, 0);
                    prop_assert!(!reply.extents.is_empty());
                    if h.flags & cmdflags::REQ_ONE != 0 { prop_assert_eq!(reply.extents.len(), 1); }
                    let total: u64 = reply.extents.iter().map(|e| e.0 as u64).sum();
                    prop_assert!(total <= h.len as u64);
                    // A hole reads as zeros.
                    let mut pos = o;
                    for &(el, st) in &reply.extents {
                        if st & state::ZERO != 0 {
                            prop_assert!(model[pos..pos + el as usize].iter().all(|b| *b == 0));
                        }
                        pos += el as usize;
                    }
                }
                _ => prop_assert_eq!(reply.error, 0),
            }
        }
        prop_assert_eq!(disk.contents(), model);
    }

    /// Reply encoders round-trip through the client-side parsers.
    #[test]
    fn replies_round_trip(cookie in any::<u64>(), error in 1u32.., message in "\\PC{0,300}", structured in any::<bool>(), offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..200)) {
        let r = Replies { structured };
        let mut out = Vec::new();
        r.error(cookie, error, &message, &mut out);
        let (h, n) = ReplyHeader::parse(&out).unwrap().unwrap();
        prop_assert_eq!(h.cookie(), cookie);
        match h {
            ReplyHeader::Simple(s) => { prop_assert!(!structured); prop_assert_eq!(s.error, error); prop_assert_eq!(n, out.len()); }
            ReplyHeader::Chunk(c) => {
                prop_assert!(structured);
                prop_assert_eq!(c.kind, chunk::ERROR);
                prop_assert_eq!(c.len as usize, out.len() - n);
                let (e, m) = proto::parse_error_chunk(&out[n..]).unwrap();
                prop_assert_eq!(e, error);
                prop_assert!(message.starts_with(&m) && m.len() <= proto::MAX_ERROR_MESSAGE);
            }
        }
        let mut room = [0u8; READ_HEADER_ROOM];
        let start = r.read_header(cookie, offset, data.len() as u32, &mut room);
        let mut whole = room[start..].to_vec();
        whole.extend_from_slice(&data);
        let (p, used) = parse_reply(&whole, (!structured).then_some(data.len() as u32));
        prop_assert_eq!(used, whole.len());
        prop_assert_eq!((p.cookie, p.error), (cookie, 0));
        prop_assert_eq!(p.data, data);
    }
}

#[test]
fn input_buffer_compacts_and_keeps_leftovers() {
    let mut b = InputBuffer::with_leftover(64, b"abc").unwrap();
    assert_eq!(b.data(), b"abc");
    b.consume(2);
    let s = b.spare();
    assert!(s.len() >= 60);
    s[0] = b'd';
    b.filled(1);
    assert_eq!(b.data(), b"cd");
    b.consume(5);
    assert!(b.is_empty());
    assert_eq!(b.spare().len(), 64);
    assert!(InputBuffer::with_leftover(40, &[0; 41]).is_none());
}

/// The test disk with a real disk's quirks: reads failing from `fails_from` on (to break a
/// READ in the middle of its reply); with `cached_tries`, every other `read_cached` finding
/// its bytes in memory, as a page cache may (without, none does).
#[derive(Debug)]
struct Quirky {
    inner: MemoryDisk,
    fails_from: u64,
    cached_tries: Option<std::sync::atomic::AtomicU32>,
}

impl BlockDevice for Quirky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.fails_from {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read(offset, buf)
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        let Some(tries) = &self.cached_tries else { return Ok(false) };
        buf.fill(0xee); // whatever a failed attempt leaves behind must not reach the client
        if tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2 == 0 {
            return Ok(false);
        }
        self.read(offset, buf).map(|()| true)
    }
    fn write(&self, o: u64, d: &[u8]) -> std::io::Result<()> {
        self.inner.write(o, d)
    }
    fn write_zeroes(&self, o: u64, l: u64, m: ZeroMode) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l, m)
    }
    fn trim(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn block_status(&self, o: u64, l: u32, out: &mut Extents) -> std::io::Result<()> {
        self.inner.block_status(o, l, out)
    }
}

fn patterned() -> MemoryDisk {
    let disk = MemoryDisk::new(SIZE as usize, false);
    let bytes: Vec<u8> = (0..SIZE as usize).map(|i| (i * 31 + 7) as u8).collect();
    disk.write(0, &bytes).unwrap();
    disk
}

/// Every piece of a READ's reply, and the largest of them.
fn read_reply(dev: &dyn BlockDevice, structured: bool, df: bool, offset: u64, len: u32) -> (Vec<Vec<u8>>, Result<(), String>) {
    let mut responder = Responder::new();
    let replies = Replies { structured };
    let mut pieces = vec![responder.execute(dev, replies, 9, Command::Read { offset, len, df }).to_vec()];
    assert_eq!(responder.last_reply(), &pieces[0][..]);
    while responder.read_pending() {
        match responder.continue_read(dev) {
            Ok(p) => pieces.push(p.to_vec()),
            Err(e) => return (pieces, Err(e.to_string())),
        }
        assert_eq!(responder.last_reply(), &pieces[pieces.len() - 1][..]);
    }
    (pieces, Ok(()))
}

#[test]
fn long_reads_leave_in_bounded_pieces() {
    let disk = patterned();
    let want = disk.contents();
    let (offset, len) = (12_345u64, 700_000u32);
    for (structured, df) in [(false, false), (true, false), (true, true)] {
        let (pieces, end) = read_reply(&disk, structured, df, offset, len);
        end.unwrap();
        assert_eq!(pieces.len(), (len as usize).div_ceil(READ_PIECE), "structured={structured} df={df}");
        assert!(pieces.iter().all(|p| p.len() <= READ_PIECE + READ_HEADER_ROOM), "a piece is bounded");
        let whole: Vec<u8> = pieces.concat();
        let (reply, used) = parse_reply(&whole, (!structured).then_some(len));
        assert_eq!(used, whole.len(), "one reply, nothing after it");
        assert_eq!((reply.cookie, reply.error), (9, 0));
        assert_eq!(reply.data, &want[offset as usize..offset as usize + len as usize]);
        // Structured without DF: each piece is its own chunk at the right offset, the last
        // one DONE; with DF: one chunk.
        if structured {
            let mut at = 0;
            let mut chunks = Vec::new();
            while at < whole.len() {
                let (h, n) = ReplyHeader::parse(&whole[at..]).unwrap().unwrap();
                let ReplyHeader::Chunk(c) = h else { panic!() };
                let off = u64::from_be_bytes(whole[at + n..at + n + 8].try_into().unwrap());
                chunks.push((off, c.len - 8, c.flags & chunk::FLAG_DONE != 0));
                at += n + c.len as usize;
            }
            if df {
                assert_eq!(chunks, vec![(offset, len, true)]);
            } else {
                assert_eq!(chunks.len(), pieces.len());
                let mut next = offset;
                for (i, &(off, l, done)) in chunks.iter().enumerate() {
                    assert_eq!(off, next);
                    assert_eq!(done, i + 1 == chunks.len());
                    next += l as u64;
                }
            }
        }
    }
}

#[test]
fn a_read_failing_midway_ends_in_an_error_chunk_or_a_close() {
    let dev = Quirky { inner: patterned(), fails_from: 300_000, cached_tries: None };
    // Structured, chunked: the data before the failure, then ERROR_OFFSET, DONE.
    let (pieces, end) = read_reply(&dev, true, false, 0, 600_000);
    end.unwrap();
    let whole: Vec<u8> = pieces.concat();
    let (reply, used) = parse_reply(&whole, None);
    assert_eq!(used, whole.len());
    assert_eq!(reply.error, errno::EIO);
    assert_eq!(reply.data.len(), 2 * READ_PIECE, "the pieces read before the failure");
    let last = pieces.last().unwrap();
    let (h, n) = ReplyHeader::parse(last).unwrap().unwrap();
    let ReplyHeader::Chunk(c) = h else { panic!() };
    assert_eq!((c.kind, c.flags & chunk::FLAG_DONE), (chunk::ERROR_OFFSET, chunk::FLAG_DONE));
    let off = u64::from_be_bytes(last[last.len() - 8..].try_into().unwrap());
    assert_eq!(off, 2 * READ_PIECE as u64);
    assert!(n > 0);
    // A simple reply, or one DF chunk, cannot say so once it began: the connection closes.
    for (structured, df) in [(false, false), (true, true)] {
        let (pieces, end) = read_reply(&dev, structured, df, 0, 600_000);
        assert!(end.is_err(), "structured={structured} df={df}");
        assert_eq!(pieces.len(), 2);
    }
    // Failing on the first piece is an ordinary error reply.
    let (pieces, end) = read_reply(&dev, false, false, 299_000, 5_000);
    end.unwrap();
    let (reply, _) = parse_reply(&pieces.concat(), None);
    assert_eq!(reply.error, errno::EIO);
}

/// A shell that answers what it can from memory and takes the rest to a thread that may
/// wait sends exactly the reply of one that always waits, piece for piece.
#[test]
fn reads_from_memory_or_the_disk_send_the_same_reply() {
    let plain = patterned();
    let dev = Quirky { inner: patterned(), fails_from: u64::MAX, cached_tries: Some(Default::default()) };
    for (structured, df) in [(false, false), (true, false), (true, true)] {
        for (offset, len) in [(12_345u64, 700_000u32), (0, 4096), (5, 0), (SIZE - 10, 10)] {
            let (want, end) = read_reply(&plain, structured, df, offset, len);
            end.unwrap();
            let mut responder = Responder::new();
            let replies = Replies { structured };
            let command = Command::Read { offset, len, df };
            let mut got = Vec::new();
            let mut from_memory = 0;
            match responder.execute_cached(&dev, replies, 9, command) {
                Some(_) => from_memory += 1,
                None => {
                    let _ = responder.execute(&dev, replies, 9, command);
                }
            }
            got.push(responder.last_reply().to_vec());
            while responder.read_pending() {
                match responder.continue_read_cached(&dev) {
                    Some(r) => {
                        r.unwrap();
                        from_memory += 1;
                    }
                    None => {
                        responder.continue_read(&dev).unwrap();
                    }
                }
                got.push(responder.last_reply().to_vec());
            }
            assert_eq!(got, want, "structured={structured} df={df} offset={offset} len={len}");
            if want.len() > 1 {
                assert!(from_memory > 0 && from_memory < want.len(), "both paths were taken");
            }
        }
    }
    // Only READs are answered from memory.
    let mut responder = Responder::new();
    assert!(responder.execute_cached(&dev, Replies { structured: true }, 1, Command::Flush).is_none());
}

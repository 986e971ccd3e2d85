//! The server side of the fixed-newstyle handshake (option haggling) as a state machine: bytes in, bytes out, and a
//! [`Status`] when the client is ready for transmission (or gone). No I/O: export names are
//! resolved through the [`ExportLookup`] the caller passes in.
//!
//! Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`), and `STARTTLS` when the
//! server has TLS ([`TlsPolicy`]); every other option gets `NBD_REP_ERR_UNSUP`. Options
//! longer than [`MAX_OPTION_LEN`] are read past and refused with `NBD_REP_ERR_TOO_BIG`; a
//! bad magic or unknown client flags close the connection.
//!
//! TLS (the protocol's "STARTTLS" section): `STARTTLS` is answered with `ACK` and
//! [`Status::StartTls`]; the shell sends that, runs the TLS handshake on the socket, calls
//! [`Handshake::tls_established`] and goes on feeding the machine what it decrypts.
//! Whatever was agreed before TLS (structured replies, meta contexts) is forgotten, as the
//! protocol requires. With [`TlsPolicy::Required`] every option before TLS but `STARTTLS`
//! and `ABORT` is answered `NBD_REP_ERR_TLS_REQD` (and `EXPORT_NAME`, which cannot be
//! answered with an error, closes the connection).

use crate::proto::*;

/// What the server tells a client about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    /// Whether `NBD_FLAG_CAN_MULTI_CONN` is honest for this export.
    pub multi_conn: bool,
    pub description: String,
}

/// Why an export cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    Unknown(String),
    /// Refused by policy (`NBD_REP_ERR_POLICY`).
    Policy(String),
    /// A server-side failure (`NBD_REP_ERR_PLATFORM`).
    Failed(String),
}

/// Export resolution during the handshake.
pub trait ExportLookup {
    /// `(name, description)` of every export this client may see, for `NBD_OPT_LIST`; an
    /// error refuses the list.
    fn list(&mut self) -> Result<Vec<(String, String)>, LookupError>;
    /// Describes the export `name`. `go` is true for `NBD_OPT_GO`/`EXPORT_NAME`: the caller
    /// may open the export now (and keep it) so that a later failure cannot follow the ACK.
    fn lookup(&mut self, name: &str, go: bool) -> Result<ExportInfo, LookupError>;
}

/// The session the handshake agreed on, handed over at the start of transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub export: String,
    pub info: ExportInfo,
    /// Transmission flags sent to the client.
    pub flags: u16,
    pub structured: bool,
    /// The context id of `base:allocation` when the client selected it.
    pub base_allocation: Option<u32>,
}

/// Where the machine stands after [`Handshake::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Needs more input (send [`Handshake::take_output`] first).
    Continue,
    /// The client asked for TLS and was told yes: send the output, then run the TLS
    /// handshake (server side) on the connection and call [`Handshake::tls_established`].
    /// A client sends nothing more before TLS: bytes after the consumed ones are a protocol
    /// violation.
    StartTls,
    /// The handshake is over: send the output, then start transmission.
    Ready(Session),
    /// The client aborted or broke the protocol: send the output, then close.
    Closed(String),
}

/// The id of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Options after which a client that never finishes its handshake is dropped.
pub const MAX_OPTIONS: u32 = 4096;

/// Whether a server offers TLS (`NBD_OPT_STARTTLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// No TLS: `STARTTLS` is unsupported.
    #[default]
    Off,
    /// Clients may upgrade to TLS or carry on without it.
    Optional,
    /// Nothing but `STARTTLS` and `ABORT` before TLS.
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Option,
    Discard { option: u32, remaining: u64 },
    /// `STARTTLS` was acknowledged; the shell runs the TLS handshake.
    AwaitTls,
    Done,
}

#[derive(Debug)]
pub struct Handshake {
    tls_policy: TlsPolicy,
    tls: bool,
    state: State,
    out: Vec<u8>,
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export name of the last SET_META_CONTEXT and whether base:allocation was selected.
    meta: Option<(String, bool)>,
    options: u32,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A new handshake without TLS; the greeting is already in the output.
    pub fn new() -> Handshake {
        Handshake::with_tls(TlsPolicy::Off)
    }

    /// A new handshake offering TLS as `policy` says; the greeting is in the output.
    pub fn with_tls(tls_policy: TlsPolicy) -> Handshake {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&encode_greeting(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES));
        Handshake {
            tls_policy,
            tls: false,
            state: State::ClientFlags,
            out,
            fixed: false,
            no_zeroes: false,
            structured: false,
            meta: None,
            options: 0,
        }
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The shell completed the TLS handshake after [`Status::StartTls`]: option haggling
    /// goes on inside TLS, from a clean slate.
    pub fn tls_established(&mut self) {
        if self.state == State::AwaitTls {
            self.tls = true;
            self.structured = false;
            self.meta = None;
            self.state = State::Option;
        }
    }

    /// Whether the handshake runs inside TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Feeds received bytes. Returns how many were consumed and the status; on
    /// [`Status::Ready`], bytes after `consumed` belong to the transmission phase.
    pub fn handle(&mut self, input: &[u8], lookup: &mut dyn ExportLookup) -> (usize, Status) {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Done => {
                    return (used, Status::Closed("handshake already finished".into()))
                }
                State::AwaitTls => {
                    self.state = State::Done;
                    return (used, Status::Closed("data before the TLS handshake".into()));
                }
                State::ClientFlags => {
                    if rest.len() < 4 {
                        return (used, Status::Continue);
                    }
                    let f = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    used += 4;
                    if f & !cflags::KNOWN != 0 {
                        self.state = State::Done;
                        return (used, Status::Closed(format!("unknown client flags {f:#x}")));
                    }
                    self.fixed = f & cflags::FIXED_NEWSTYLE != 0;
                    self.no_zeroes = f & cflags::NO_ZEROES != 0;
                    self.state = State::Option;
                }
                State::Discard { option, remaining } => {
                    let n = (rest.len() as u64).min(remaining) as usize;
                    used += n;
                    if (n as u64) < remaining {
                        self.state = State::Discard {
                            option,
                            remaining: remaining - n as u64,
                        };
                        return (used, Status::Continue);
                    }
                    self.reply(option, rep::ERR_TOO_BIG, b"option too long");
                    self.state = State::Option;
                }
                State::Option => {
                    let h = match OptionHeader::parse(rest) {
                        Ok(Some(h)) => h,
                        Ok(None) => return (used, Status::Continue),
                        Err(e) => {
                            self.state = State::Done;
                            return (used, Status::Closed(format!("option: {e}")));
                        }
                    };
                    self.options += 1;
                    if self.options > MAX_OPTIONS {
                        self.state = State::Done;
                        return (used, Status::Closed("too many options".into()));
                    }
                    if h.len > MAX_OPTION_LEN {
                        if h.option == opt::EXPORT_NAME {
                            // No error reply exists for EXPORT_NAME.
                            self.state = State::Done;
                            return (
                                used + OptionHeader::SIZE,
                                Status::Closed("export name too long".into()),
                            );
                        }
                        used += OptionHeader::SIZE;
                        self.state = State::Discard {
                            option: h.option,
                            remaining: h.len as u64,
                        };
                        continue;
                    }
                    let total = OptionHeader::SIZE + h.len as usize;
                    if rest.len() < total {
                        return (used, Status::Continue);
                    }
                    let data = &rest[OptionHeader::SIZE..total];
                    used += total;
                    if let Some(status) = self.option(h.option, data, lookup) {
                        return (used, status);
                    }
                }
            }
        }
    }

    fn starttls(&mut self, data: &[u8]) -> Option<Status> {
        let code = opt::STARTTLS;
        if self.tls_policy == TlsPolicy::Off {
            self.reply(code, rep::ERR_UNSUP, b"this server has no TLS");
            None
        } else if self.tls {
            self.reply(code, rep::ERR_INVALID, b"TLS is already on");
            None
        } else if !data.is_empty() {
            self.reply(code, rep::ERR_INVALID, b"STARTTLS takes no data");
            None
        } else {
            self.reply(code, rep::ACK, &[]);
            self.state = State::AwaitTls;
            Some(Status::StartTls)
        }
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        OptionReply::encode_parts(&mut self.out, option, reply, data);
    }

    fn transmission_flags(&self, info: &ExportInfo) -> u16 {
        let mut f = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_CACHE;
        if info.read_only {
            f |= tflags::READ_ONLY;
        } else {
            f |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
        }
        if info.multi_conn {
            f |= tflags::CAN_MULTI_CONN;
        }
        if self.structured {
            f |= tflags::SEND_DF;
        }
        f
    }

    fn lookup_error(&mut self, option: u32, e: LookupError) {
        let (t, msg) = match e {
            LookupError::Unknown(m) => (rep::ERR_UNKNOWN, m),
            LookupError::Policy(m) => (rep::ERR_POLICY, m),
            LookupError::Failed(m) => (rep::ERR_PLATFORM, m),
        };
        let mut msg = msg.into_bytes();
        msg.truncate(MAX_STRING_LEN);
        self.reply(option, t, &msg);
    }

    fn session(&self, export: String, info: ExportInfo) -> Session {
        let base_allocation = match &self.meta {
            Some((name, true)) if *name == export && self.structured => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        Session {
            flags: self.transmission_flags(&info),
            export,
            info,
            structured: self.structured,
            base_allocation,
        }
    }

    /// Handles one whole option; `Some` ends the handshake.
    fn option(&mut self, code: u32, data: &[u8], lookup: &mut dyn ExportLookup) -> Option<Status> {
        if code == opt::STARTTLS {
            return self.starttls(data);
        }
        if self.tls_policy == TlsPolicy::Required && !self.tls && code != opt::ABORT {
            if code == opt::EXPORT_NAME {
                self.state = State::Done;
                return Some(Status::Closed("export name before TLS, which this server requires".into()));
            }
            self.reply(code, rep::ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS) first");
            return None;
        }
        let parsed = match NbdOption::decode(code, data) {
            Ok(o) => o,
            Err(e) => {
                if code == opt::EXPORT_NAME {
                    self.state = State::Done;
                    return Some(Status::Closed(format!("export name: {e}")));
                }
                self.reply(code, rep::ERR_INVALID, e.to_string().as_bytes());
                return None;
            }
        };
        match parsed {
            NbdOption::Abort => {
                self.reply(code, rep::ACK, &[]);
                self.state = State::Done;
                Some(Status::Closed("client aborted".into()))
            }
            NbdOption::List => {
                match lookup.list() {
                    Ok(exports) => {
                        for (name, desc) in exports {
                            let d = rep_server(&name, &desc);
                            self.reply(code, rep::SERVER, &d);
                        }
                        self.reply(code, rep::ACK, &[]);
                    }
                    Err(e) => self.lookup_error(code, e),
                }
                None
            }
            NbdOption::StructuredReply => {
                if self.structured {
                    self.reply(
                        code,
                        rep::ERR_INVALID,
                        b"structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    self.reply(code, rep::ACK, &[]);
                }
                None
            }
            NbdOption::ExportName(name) => match lookup.lookup(&name, true) {
                Ok(info) => {
                    let n = self.session(name, info);
                    encode_export_name_reply(&mut self.out, n.info.size, n.flags, self.no_zeroes);
                    self.state = State::Done;
                    Some(Status::Ready(n))
                }
                Err(e) => {
                    self.state = State::Done;
                    Some(Status::Closed(format!("export {name:?}: {e:?}")))
                }
            },
            NbdOption::Info(req) | NbdOption::Go(req) => {
                let go = code == opt::GO;
                match lookup.lookup(&req.name, go) {
                    Err(e) => {
                        self.lookup_error(code, e);
                        None
                    }
                    Ok(info) => {
                        let n = self.session(req.name.clone(), info);
                        self.reply(code, rep::INFO, &info_export(n.info.size, n.flags));
                        for &r in &req.requests {
                            match r {
                                info::NAME => {
                                    self.reply(code, rep::INFO, &info_string(info::NAME, &req.name))
                                }
                                info::DESCRIPTION if !n.info.description.is_empty() => {
                                    let d = info_string(info::DESCRIPTION, &n.info.description);
                                    self.reply(code, rep::INFO, &d)
                                }
                                info::BLOCK_SIZE => self.reply(
                                    code,
                                    rep::INFO,
                                    &info_block_size(1, 4096, MAX_REQUEST_LEN),
                                ),
                                _ => {}
                            }
                        }
                        self.reply(code, rep::ACK, &[]);
                        if go {
                            self.state = State::Done;
                            Some(Status::Ready(n))
                        } else {
                            None
                        }
                    }
                }
            }
            NbdOption::ListMetaContext(req) | NbdOption::SetMetaContext(req) => {
                let set = code == opt::SET_META_CONTEXT;
                if !self.structured {
                    self.reply(
                        code,
                        rep::ERR_INVALID,
                        b"negotiate structured replies first",
                    );
                    return None;
                }
                if let Err(e) = lookup.lookup(&req.name, false) {
                    self.lookup_error(code, e);
                    return None;
                }
                let matches = |q: &str| {
                    if set {
                        q == BASE_ALLOCATION
                    } else {
                        q == BASE_ALLOCATION || q == "base:"
                    }
                };
                let selected = if req.queries.is_empty() {
                    !set // LIST with no query lists everything; SET with none selects nothing
                } else {
                    req.queries.iter().any(|q| matches(q))
                };
                if selected {
                    self.reply(
                        code,
                        rep::META_CONTEXT,
                        &rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION),
                    );
                }
                if set {
                    self.meta = Some((req.name, selected));
                }
                self.reply(code, rep::ACK, &[]);
                None
            }
            NbdOption::Other { option, .. } => {
                self.reply(option, rep::ERR_UNSUP, &[]);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct One;
    impl ExportLookup for One {
        fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
            Ok(vec![("disk".into(), "a disk".into())])
        }
        fn lookup(&mut self, name: &str, _go: bool) -> Result<ExportInfo, LookupError> {
            match name {
                "disk" => Ok(ExportInfo {
                    size: 1 << 20,
                    read_only: false,
                    multi_conn: true,
                    description: String::new(),
                }),
                "ro" => Ok(ExportInfo {
                    size: 4096,
                    read_only: true,
                    multi_conn: true,
                    description: String::new(),
                }),
                _ => Err(LookupError::Unknown(format!("no export {name}"))),
            }
        }
    }

    fn replies(mut b: &[u8]) -> Vec<OptionReply> {
        let mut v = Vec::new();
        while let Some((r, n)) = OptionReply::parse(b).unwrap() {
            v.push(r);
            b = &b[n..];
        }
        assert!(b.is_empty());
        v
    }

    fn start() -> Handshake {
        let mut h = Handshake::new();
        let g = h.take_output();
        assert_eq!(
            parse_greeting(&g).unwrap(),
            Some(hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES)
        );
        let (n, s) = h.handle(
            &(cflags::FIXED_NEWSTYLE | cflags::NO_ZEROES).to_be_bytes(),
            &mut One,
        );
        assert_eq!((n, s), (4, Status::Continue));
        h
    }

    fn go(name: &str) -> Vec<u8> {
        let mut b = Vec::new();
        NbdOption::Go(InfoRequest {
            name: name.into(),
            requests: vec![info::BLOCK_SIZE, info::NAME],
        })
        .encode(&mut b);
        b
    }

    #[test]
    fn full_handshake_byte_by_byte() {
        let mut h = start();
        let mut input = Vec::new();
        NbdOption::StructuredReply.encode(&mut input);
        NbdOption::SetMetaContext(MetaRequest {
            name: "disk".into(),
            queries: vec!["base:allocation".into(), "x:y".into()],
        })
        .encode(&mut input);
        NbdOption::Other {
            option: 99,
            data: vec![1, 2, 3],
        }
        .encode(&mut input);
        NbdOption::List.encode(&mut input);
        input.extend_from_slice(&go("nope"));
        input.extend_from_slice(&go("disk"));
        input.extend_from_slice(b"TRANSMISSION");
        // Bytes arrive one at a time; the shell keeps what was not consumed.
        let mut status = Status::Continue;
        let mut pending = Vec::new();
        let mut i = 0;
        while i < input.len() && status == Status::Continue {
            pending.push(input[i]);
            i += 1;
            let (n, s) = h.handle(&pending, &mut One);
            pending.drain(..n);
            status = s;
        }
        assert!(pending.is_empty());
        assert_eq!(&input[i..], b"TRANSMISSION");
        let Status::Ready(n) = status else {
            panic!("{status:?}")
        };
        assert_eq!(n.export, "disk");
        assert!(n.structured);
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(n.flags & tflags::CAN_MULTI_CONN, 0);
        assert_eq!(n.flags & tflags::READ_ONLY, 0);
        let r = replies(&h.take_output());
        let kinds: Vec<_> = r.iter().map(|r| (r.option, r.reply)).collect();
        assert_eq!(
            kinds,
            vec![
                (opt::STRUCTURED_REPLY, rep::ACK),
                (opt::SET_META_CONTEXT, rep::META_CONTEXT),
                (opt::SET_META_CONTEXT, rep::ACK),
                (99, rep::ERR_UNSUP),
                (opt::LIST, rep::SERVER),
                (opt::LIST, rep::ACK),
                (opt::GO, rep::ERR_UNKNOWN),
                (opt::GO, rep::INFO),
                (opt::GO, rep::INFO),
                (opt::GO, rep::INFO),
                (opt::GO, rep::ACK),
            ]
        );
        assert_eq!(r[7].data, info_export(1 << 20, n.flags));
    }

    #[test]
    fn export_name_and_abort() {
        let mut h = start();
        let mut b = Vec::new();
        NbdOption::ExportName("ro".into()).encode(&mut b);
        let (n, s) = h.handle(&b, &mut One);
        assert_eq!(n, b.len());
        let Status::Ready(neg) = s else { panic!() };
        assert_ne!(neg.flags & tflags::READ_ONLY, 0);
        assert_eq!(h.take_output().len(), 10, "NO_ZEROES was agreed");

        let mut h = start();
        let mut b = Vec::new();
        NbdOption::Abort.encode(&mut b);
        let (_, s) = h.handle(&b, &mut One);
        assert!(matches!(s, Status::Closed(_)));
        assert_eq!(replies(&h.take_output())[0].reply, rep::ACK);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_matching_export() {
        let mut h = start();
        let mut b = Vec::new();
        NbdOption::SetMetaContext(MetaRequest {
            name: "disk".into(),
            queries: vec![BASE_ALLOCATION.into()],
        })
        .encode(&mut b);
        h.handle(&b, &mut One);
        assert_eq!(replies(&h.take_output())[0].reply, rep::ERR_INVALID);

        let mut h = start();
        let mut b = Vec::new();
        NbdOption::StructuredReply.encode(&mut b);
        NbdOption::SetMetaContext(MetaRequest {
            name: "disk".into(),
            queries: vec![BASE_ALLOCATION.into()],
        })
        .encode(&mut b);
        b.extend_from_slice(&go("ro"));
        let (_, s) = h.handle(&b, &mut One);
        let Status::Ready(n) = s else { panic!() };
        assert_eq!(
            n.base_allocation, None,
            "contexts were set for another export"
        );
    }

    #[test]
    fn bad_input_closes_or_errors() {
        // Unknown client flags.
        let mut h = Handshake::new();
        let (_, s) = h.handle(&0x80u32.to_be_bytes(), &mut One);
        assert!(matches!(s, Status::Closed(_)));
        // Bad option magic.
        let mut h = start();
        let (_, s) = h.handle(&[0x55; 16], &mut One);
        assert!(matches!(s, Status::Closed(_)));
        // Oversized option: read past, ERR_TOO_BIG, then the handshake continues.
        let mut h = start();
        let mut b = Vec::new();
        OptionHeader {
            option: opt::INFO,
            len: MAX_OPTION_LEN + 10,
        }
        .encode(&mut b);
        b.extend(std::iter::repeat_n(0u8, MAX_OPTION_LEN as usize + 10));
        b.extend_from_slice(&go("disk"));
        let (n, s) = h.handle(&b, &mut One);
        assert_eq!(n, b.len());
        assert!(matches!(s, Status::Ready(_)));
        assert_eq!(replies(&h.take_output())[0].reply, rep::ERR_TOO_BIG);
        // A malformed GO payload: ERR_INVALID, not a close.
        let mut h = start();
        let mut b = Vec::new();
        OptionHeader {
            option: opt::GO,
            len: 3,
        }
        .encode(&mut b);
        b.extend_from_slice(&[0, 0, 9]);
        let (_, s) = h.handle(&b, &mut One);
        assert_eq!(s, Status::Continue);
        assert_eq!(replies(&h.take_output())[0].reply, rep::ERR_INVALID);
    }

    fn start_with(policy: TlsPolicy) -> Handshake {
        let mut h = Handshake::with_tls(policy);
        h.take_output();
        let (n, s) = h.handle(&(cflags::FIXED_NEWSTYLE | cflags::NO_ZEROES).to_be_bytes(), &mut One);
        assert_eq!((n, s), (4, Status::Continue));
        h
    }

    fn option(o: NbdOption) -> Vec<u8> {
        let mut b = Vec::new();
        o.encode(&mut b);
        b
    }

    fn starttls() -> Vec<u8> {
        option(NbdOption::Other { option: opt::STARTTLS, data: vec![] })
    }

    #[test]
    fn tls_required_refuses_everything_before_starttls() {
        let mut h = start_with(TlsPolicy::Required);
        let mut b = option(NbdOption::StructuredReply);
        b.extend(option(NbdOption::List));
        b.extend(go("disk"));
        let (n, s) = h.handle(&b, &mut One);
        assert_eq!((n, s), (b.len(), Status::Continue));
        let kinds: Vec<_> = replies(&h.take_output()).iter().map(|r| (r.option, r.reply)).collect();
        assert_eq!(
            kinds,
            vec![
                (opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD),
                (opt::LIST, rep::ERR_TLS_REQD),
                (opt::GO, rep::ERR_TLS_REQD)
            ]
        );
        // EXPORT_NAME has no error reply: the connection closes.
        let (_, s) = h.handle(&option(NbdOption::ExportName("disk".into())), &mut One);
        assert!(matches!(s, Status::Closed(_)), "{s:?}");
        // ABORT is always allowed.
        let mut h = start_with(TlsPolicy::Required);
        let (_, s) = h.handle(&option(NbdOption::Abort), &mut One);
        assert!(matches!(s, Status::Closed(_)));
        assert_eq!(replies(&h.take_output())[0].reply, rep::ACK);
    }

    #[test]
    fn starttls_then_a_clean_slate_inside_tls() {
        let mut h = start_with(TlsPolicy::Required);
        // Bytes after STARTTLS (a client that did not wait for the ACK) are not consumed.
        let mut b = starttls();
        b.extend_from_slice(b"\x16\x03\x01");
        let (n, s) = h.handle(&b, &mut One);
        assert_eq!((n, s), (b.len() - 3, Status::StartTls));
        assert_eq!(replies(&h.take_output())[0].reply, rep::ACK);
        assert!(!h.is_tls());
        h.tls_established();
        assert!(h.is_tls());
        // Inside TLS: a second STARTTLS is invalid, everything else works.
        let mut b = starttls();
        b.extend(option(NbdOption::StructuredReply));
        b.extend(go("disk"));
        let (n, s) = h.handle(&b, &mut One);
        assert_eq!(n, b.len());
        let Status::Ready(neg) = s else { panic!("{s:?}") };
        assert!(neg.structured);
        let kinds: Vec<_> = replies(&h.take_output()).iter().map(|r| r.reply).collect();
        assert_eq!(kinds[..2], [rep::ERR_INVALID, rep::ACK]);

        // Structured replies agreed before TLS do not survive it.
        let mut h = start_with(TlsPolicy::Optional);
        let mut b = option(NbdOption::StructuredReply);
        b.extend(starttls());
        let (_, s) = h.handle(&b, &mut One);
        assert_eq!(s, Status::StartTls);
        h.take_output();
        h.tls_established();
        let (_, s) = h.handle(&go("disk"), &mut One);
        let Status::Ready(neg) = s else { panic!("{s:?}") };
        assert!(!neg.structured, "structured replies were agreed in plain text only");

        // Optional TLS: a client may also stay in plain text.
        let mut h = start_with(TlsPolicy::Optional);
        let (_, s) = h.handle(&go("disk"), &mut One);
        assert!(matches!(s, Status::Ready(_)));
        // No TLS at all: STARTTLS is unsupported, the handshake goes on.
        let mut h = start();
        let (_, s) = h.handle(&starttls(), &mut One);
        assert_eq!(s, Status::Continue);
        assert_eq!(replies(&h.take_output())[0].reply, rep::ERR_UNSUP);
    }

    #[test]
    fn a_refused_list_is_an_error_reply() {
        struct Refusing;
        impl ExportLookup for Refusing {
            fn list(&mut self) -> Result<Vec<(String, String)>, LookupError> {
                Err(LookupError::Policy("not from here".into()))
            }
            fn lookup(&mut self, _: &str, _: bool) -> Result<ExportInfo, LookupError> {
                Err(LookupError::Policy("not from here".into()))
            }
        }
        let mut h = Handshake::new();
        h.take_output();
        h.handle(&3u32.to_be_bytes(), &mut Refusing);
        let (_, s) = h.handle(&option(NbdOption::List), &mut Refusing);
        assert_eq!(s, Status::Continue);
        let r = replies(&h.take_output());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].reply, rep::ERR_POLICY);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20), valid_prefix in any::<bool>()) {
            let mut h = Handshake::new();
            if valid_prefix {
                h.handle(&3u32.to_be_bytes(), &mut One);
            }
            for c in chunks {
                let mut off = 0;
                loop {
                    let (n, s) = h.handle(&c[off..], &mut One);
                    prop_assert!(n <= c.len() - off);
                    off += n;
                    if s != Status::Continue || n == 0 { break; }
                }
                let _ = h.take_output();
            }
        }
    }
}

//! The negotiator: clears a (multicast group, port) with the other negotiators before it
//! hands it to a client, and sets the file up on a file server.
//!
//! A machine of the `fleetboot_proto` contract: [`Negotiator::request`] (a client asks for
//! a file), [`handle_peer`](Negotiator::handle_peer) (a datagram on the peer port),
//! [`handle_file_server`](Negotiator::handle_file_server) (one from a file server) and
//! [`handle_timeout`](Negotiator::handle_timeout) take `now`; the shell drains
//! [`poll_transmit`](Negotiator::poll_transmit) and [`poll_event`](Negotiator::poll_event)
//! and sleeps until [`poll_timeout`](Negotiator::poll_timeout).
//!
//! Every transmit names its destination: a message for all peers is one transmit per
//! [`NegotiatorConfig::peers`] entry (the peer group, or each listed peer). A transmit to one
//! of [`NegotiatorConfig::file_servers`] ([`Negotiator::is_file_server`]) leaves from the
//! shell's file-server socket, whose replies come back to it; every other one from the peer
//! socket (the peer port), where answers to queries arrive.
//!
//! # One boot file, from request to answer
//!
//! 1. A client asks for file F. If this negotiator already holds an assignment for F it
//!    answers at once ([`Event::Ready`]). Otherwise it emits [`Event::Wait`] and starts a job:
//!    pick a file server (primary first), pick a slot, **clear** it.
//! 2. Clearing (`docs/protocols.md`): send a conflict query to all negotiators, repeated
//!    `query_tries` times across the first half of `wait_period` (a lost query is the one
//!    failure silence cannot reveal; the second half lets the last answer come back). A response (the query echoed with opcode 1) means a conflict: the slot is
//!    marked used, the waiting clients get another [`Event::Wait`], another slot is picked and
//!    cleared. No response within the period: proceed.
//! 3. PREPARE to the file server, retried; ACK -> the assignment is active and every waiting
//!    client gets [`Event::Ready`]. NAK busy -> mark the slot, clear another. NAK no such file
//!    or no answer -> the next file server (secondary), cleared again since the file server is
//!    part of the query.
//!
//! # Answering queries
//!
//! A query for a slot this negotiator uses (assignment active, or being prepared) is
//! answered unless the querier uses the same file server for the same file. A query for a
//! slot it does not use gets no answer.
//!
//! # Beyond query and response: ties, expiry, hints
//!
//! - **Simultaneous queries**: a negotiator still *clearing* slot S hears another
//!   negotiator's query for S with another file. The lower address wins: the lower one
//!   answers (so the other backs off even if it never hears the lower one's own query); the
//!   higher one stays silent, marks S used and clears another slot.
//! - **Reclaiming**: learned "used" marks expire (`used_ttl`) unless the owner renews them
//!   with periodic announcements (opcode 2); the file server drops a negotiator's
//!   registration unless renewed by PREPARE. A negotiator that dies therefore stops
//!   renewing, and its slots come free everywhere. Its file server keeps answering queries for
//!   the slot until the registration expires, so the slot is never reused early.
//! - **Hints**: a query heard from another negotiator marks its slot for two wait periods,
//!   and slots another negotiator announced for the same file on the same file server are
//!   preferred (sharing one multicast per file is the point of multicast).

use crate::auth::{PeerAuth, Refusals};
use crate::wire::{ConflictOp, ConflictPacket, FsMessage, FsOp, NakReason, Slot};
use fleetboot_proto::Transmit;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Who asked: an opaque token of the shell's (e.g. the client's MAC).
pub type ClientToken = u64;

#[derive(Debug, Clone)]
pub struct NegotiatorConfig {
    /// This negotiator's address: how the others see it, and the tie-break (lower wins).
    pub id: Ipv4Addr,
    /// PXE boot server type and layer, carried in conflict queries.
    pub negotiator_type: u16,
    pub layer: u16,
    /// The pool of (group, client port) this negotiator may hand out.
    pub slots: Vec<Slot>,
    /// Where clients send their MTFTP RRQ on the file server.
    pub server_port: u16,
    /// File servers' control addresses, primary first.
    pub file_servers: Vec<SocketAddrV4>,
    /// Where a message for all negotiators (and file servers) goes: the peer group and/or
    /// each peer, on the peer port. This negotiator's own address is skipped.
    pub peers: Vec<SocketAddrV4>,
    pub wait_period: Duration,
    pub query_tries: u32,
    pub prepare_retry: Duration,
    pub prepare_tries: u32,
    pub renew_interval: Duration,
    pub announce_interval: Duration,
    /// How long a slot learned as used (a response, a NAK busy, an announcement) stays used.
    /// Must exceed the file server's registration TTL.
    pub used_ttl: Duration,
    /// An assignment no client asked for during `hold` is released (DELETE).
    pub hold: Duration,
    /// A file server that did not answer is skipped for this long.
    pub server_down_for: Duration,
    /// A client is answered from an assignment at once only if its file server confirmed it
    /// this recently; otherwise the file server is asked first (the client gets a wait
    /// packet), so a file server that died is noticed before clients are sent to it.
    pub confirm_within: Duration,
    /// Authentication of every message to and from peers and file servers. The shells
    /// always set it; `None` (no trailer sent, none checked) is for simulations.
    pub auth: Option<PeerAuth>,
    /// Mixed into the first xid, so ids are not predictable from the address alone (the
    /// shell passes random bits).
    pub xid_seed: u32,
}

impl NegotiatorConfig {
    /// Lab defaults: a 1 s wait period, renewals every 5 s, marks kept 30 s.
    pub fn new(
        id: Ipv4Addr,
        slots: Vec<Slot>,
        server_port: u16,
        file_servers: Vec<SocketAddrV4>,
        peers: Vec<SocketAddrV4>,
    ) -> Self {
        NegotiatorConfig {
            id,
            negotiator_type: 0x8000,
            layer: 0,
            slots,
            server_port,
            file_servers,
            peers,
            wait_period: Duration::from_secs(1),
            query_tries: 3,
            prepare_retry: Duration::from_millis(400),
            prepare_tries: 4,
            renew_interval: Duration::from_secs(5),
            announce_interval: Duration::from_secs(5),
            used_ttl: Duration::from_secs(30),
            hold: Duration::from_secs(60),
            server_down_for: Duration::from_secs(30),
            confirm_within: Duration::from_secs(1),
            auth: None,
            xid_seed: 0,
        }
    }
}

/// What a client is told to use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assignment {
    pub file: String,
    /// The MTFTP server's IPv4 (the file server) and the port its RRQs go to.
    pub file_server: Ipv4Addr,
    pub server_port: u16,
    pub slot: Slot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Tell the client to wait (clearing started, or a conflict sent it round again).
    Wait { client: ClientToken, file: String },
    Ready {
        client: ClientToken,
        assignment: Assignment,
    },
    Failed {
        client: ClientToken,
        file: String,
        reason: &'static str,
    },
    /// A slot turned out to be used by someone else (for the log).
    Conflict {
        slot: Slot,
        file: String,
        by: Ipv4Addr,
    },
    /// An assignment became usable (for the records).
    Activated(Assignment),
    /// An assignment ended: released after `hold`, withdrawn, or its file server died.
    Released {
        assignment: Assignment,
        reason: &'static str,
    },
}

#[derive(Debug, Clone)]
enum Phase {
    Querying {
        sent: u32,
        next_send: Instant,
        deadline: Instant,
    },
    Preparing {
        xid: u32,
        sent: u32,
        next_send: Instant,
    },
}

#[derive(Debug, Clone)]
struct Job {
    server: usize,
    /// File servers tried for this job so far.
    tried: usize,
    slot: Slot,
    phase: Phase,
    waiters: Vec<ClientToken>,
}

#[derive(Debug, Clone)]
struct Active {
    server: usize,
    slot: Slot,
    last_used: Instant,
    next_announce: Instant,
    next_renew: Instant,
    renew_xid: u32,
    unanswered: u32,
    /// When the file server last acknowledged this assignment.
    confirmed_at: Instant,
    /// Clients waiting for that acknowledgement.
    waiters: Vec<ClientToken>,
}

/// A slot someone else uses. `file` is `None` when only "used, not by you" is known.
#[derive(Debug, Clone)]
struct Mark {
    file: Option<(String, Ipv4Addr)>,
    until: Instant,
    /// Only heard in a query: weaker than a response or announcement.
    hint: bool,
}

#[derive(Debug, Clone)]
struct Releasing {
    server: usize,
    msg: FsMessage,
    sent: u32,
    next_send: Instant,
}

pub struct Negotiator {
    cfg: NegotiatorConfig,
    jobs: BTreeMap<String, Job>,
    active: BTreeMap<String, Active>,
    marks: BTreeMap<Slot, Mark>,
    releasing: Vec<Releasing>,
    down_until: Vec<Option<Instant>>,
    next_xid: u32,
    transmits: VecDeque<(SocketAddrV4, Vec<u8>)>,
    events: VecDeque<Event>,
    auth: Option<PeerAuth>,
}

/// Datagrams waiting to be sent, at most: a shell that stopped draining must not make the
/// negotiator grow without bound (the protocol retries what matters).
pub const MAX_QUEUED: usize = 4096;

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Negotiator {
    pub fn new(mut cfg: NegotiatorConfig) -> Negotiator {
        let n = cfg.file_servers.len();
        Negotiator {
            auth: cfg.auth.take(),
            next_xid: u32::from(cfg.id).rotate_left(16) ^ cfg.xid_seed,
            cfg,
            jobs: BTreeMap::new(),
            active: BTreeMap::new(),
            marks: BTreeMap::new(),
            releasing: Vec::new(),
            down_until: vec![None; n],
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &NegotiatorConfig {
        &self.cfg
    }

    /// Assignments this negotiator is handing out now.
    pub fn assignments(&self) -> Vec<Assignment> {
        self.active
            .iter()
            .map(|(f, a)| self.assignment(f, a.server, a.slot))
            .collect()
    }

    /// Appends the next datagram to `buf` (with its authentication trailer).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let (to, bytes) = self.transmits.pop_front()?;
        let bytes = match &mut self.auth {
            Some(a) => a.seal(now, bytes),
            None => bytes,
        };
        Some(fleetboot_proto::append(buf, SocketAddr::V4(to), |b| b.extend_from_slice(&bytes)))
    }

    /// Datagrams dropped because they did not authenticate (`None` without authentication).
    pub fn refusals(&self) -> Option<&Refusals> {
        self.auth.as_ref().map(PeerAuth::refusals)
    }

    /// The message in an authenticated datagram from `from`, or `None` (counted).
    fn open<'a>(&mut self, now: Instant, from: Ipv4Addr, bytes: &'a [u8]) -> Option<&'a [u8]> {
        match &mut self.auth {
            Some(a) => a.open(now, from, bytes),
            None => Some(bytes),
        }
    }

    /// Whether a transmit to `to` is for a file server (it leaves from the file-server
    /// socket; see the module documentation).
    pub fn is_file_server(&self, to: SocketAddr) -> bool {
        matches!(to, SocketAddr::V4(a) if self.cfg.file_servers.contains(&a))
    }

    fn queue(&mut self, to: SocketAddrV4, bytes: Vec<u8>) {
        if self.transmits.len() < MAX_QUEUED {
            self.transmits.push_back((to, bytes));
        }
    }

    fn queue_for_peers(&mut self, bytes: Vec<u8>) {
        let peers: Vec<SocketAddrV4> = self.cfg.peers.iter().copied().filter(|p| *p.ip() != self.cfg.id).collect();
        for p in peers {
            self.queue(p, bytes.clone());
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn assignment(&self, file: &str, server: usize, slot: Slot) -> Assignment {
        Assignment {
            file: file.to_string(),
            file_server: *self.cfg.file_servers[server].ip(),
            server_port: self.cfg.server_port,
            slot,
        }
    }

    fn fs_ip(&self, server: usize) -> Ipv4Addr {
        *self.cfg.file_servers[server].ip()
    }

    fn server_up(&self, server: usize, now: Instant) -> bool {
        self.down_until[server].is_none_or(|t| t <= now)
    }

    /// A client asks for `file`.
    pub fn request(&mut self, now: Instant, client: ClientToken, file: &str) {
        if let Some(a) = self.active.get_mut(file) {
            if self.down_until[a.server].is_none_or(|t| t <= now) {
                a.last_used = now;
                if now.saturating_duration_since(a.confirmed_at) > self.cfg.confirm_within {
                    return self.confirm(now, file, client);
                }
                let (server, slot) = (a.server, a.slot);
                let assignment = self.assignment(file, server, slot);
                self.events.push_back(Event::Ready { client, assignment });
                return;
            }
            // Its file server went quiet: give the slot up properly (DELETE, and the slot
            // stays marked until that file server's registration has surely expired).
            self.withdraw(now, file, "file server stopped answering");
        }
        self.events.push_back(Event::Wait {
            client,
            file: file.to_string(),
        });
        if let Some(job) = self.jobs.get_mut(file) {
            if !job.waiters.contains(&client) {
                job.waiters.push(client);
            }
            return;
        }
        if self.cfg.file_servers.is_empty() {
            return self.fail_waiters(file, vec![client], "no file servers configured");
        }
        let n = self.cfg.file_servers.len();
        let server = (0..n).find(|&s| self.server_up(s, now)).unwrap_or(0);
        self.start_job(now, file, server, 1, vec![client]);
    }

    /// Asks the file server to confirm `file`'s assignment (a renewal PREPARE, now) and
    /// answers `client` when it does; an unanswered renewal moves the waiters elsewhere.
    fn confirm(&mut self, now: Instant, file: &str, client: ClientToken) {
        self.events.push_back(Event::Wait {
            client,
            file: file.to_string(),
        });
        let a = self.active.get_mut(file).expect("confirming an active assignment");
        if !a.waiters.contains(&client) {
            a.waiters.push(client);
        }
        if a.unanswered == 0 {
            self.renew(now, file); // else a renewal is already out
        }
    }

    /// Sends `file`'s renewal PREPARE. The next one follows after `renew_interval`, or
    /// after `prepare_retry` while one is unanswered and clients wait on it or it is a retry.
    fn renew(&mut self, now: Instant, file: &str) {
        let a = &self.active[file];
        let (server, slot) = (a.server, a.slot);
        let xid = self.xid();
        let msg = self.prepare_msg(xid, file, slot);
        self.send_fs(server, &msg);
        let a = self.active.get_mut(file).expect("active");
        a.renew_xid = xid;
        a.unanswered += 1;
        let urgent = a.unanswered > 1 || !a.waiters.is_empty();
        a.next_renew = now + if urgent { self.cfg.prepare_retry } else { self.cfg.renew_interval };
    }

    /// Clients that waited on an assignment that is gone: a new job (or the running one).
    fn requeue(&mut self, now: Instant, file: &str, waiters: Vec<ClientToken>) {
        if waiters.is_empty() {
            return;
        }
        if let Some(job) = self.jobs.get_mut(file) {
            for c in waiters {
                if !job.waiters.contains(&c) {
                    job.waiters.push(c);
                }
            }
            return;
        }
        let n = self.cfg.file_servers.len();
        match (0..n).find(|&s| self.server_up(s, now)) {
            Some(server) => self.start_job(now, file, server, 1, waiters),
            None => self.fail_waiters(file, waiters, "no file server answers"),
        }
    }

    fn fail_waiters(&mut self, file: &str, waiters: Vec<ClientToken>, reason: &'static str) {
        for client in waiters {
            self.events.push_back(Event::Failed {
                client,
                file: file.to_string(),
                reason,
            });
        }
    }

    fn start_job(
        &mut self,
        now: Instant,
        file: &str,
        server: usize,
        tried: usize,
        waiters: Vec<ClientToken>,
    ) {
        let Some(slot) = self.pick_slot(now, file, server) else {
            return self.fail_waiters(file, waiters, "no free multicast slot");
        };
        let deadline = now + self.cfg.wait_period;
        let job = Job {
            server,
            tried,
            slot,
            phase: Phase::Querying {
                sent: 1,
                next_send: now + self.query_gap(),
                deadline,
            },
            waiters,
        };
        self.jobs.insert(file.to_string(), job);
        self.send_query(file, server, slot);
    }

    /// Queries are spread over the first half of the wait period, so the answer to the last
    /// one still has half the period to come back (a late answer is only caught after the
    /// PREPARE went out).
    fn query_gap(&self) -> Duration {
        self.cfg.wait_period / (2 * self.cfg.query_tries.max(1))
    }

    fn conflict_packet(
        &self,
        op: ConflictOp,
        file: &str,
        server: usize,
        slot: Slot,
    ) -> ConflictPacket {
        ConflictPacket {
            op,
            file_server: self.fs_ip(server),
            negotiator_type: self.cfg.negotiator_type,
            layer: self.cfg.layer,
            group: slot.group,
            port: slot.port,
            boot_file: file.to_string(),
        }
    }

    fn send_query(&mut self, file: &str, server: usize, slot: Slot) {
        if let Ok(bytes) = self.conflict_packet(ConflictOp::Query, file, server, slot).encode() {
            self.queue_for_peers(bytes);
        }
    }

    fn send_fs(&mut self, server: usize, msg: &FsMessage) {
        if let Ok(bytes) = msg.encode() {
            self.queue(self.cfg.file_servers[server], bytes);
        }
    }

    fn xid(&mut self) -> u32 {
        self.next_xid = self.next_xid.wrapping_add(1);
        self.next_xid
    }

    /// Is `slot` used by this negotiator for something other than (file, server)?
    fn own_use_conflicts(&self, slot: Slot, file: &str, fs: Ipv4Addr) -> bool {
        self.active
            .iter()
            .map(|(f, a)| (f, a.server, a.slot))
            .chain(self.jobs.iter().map(|(f, j)| (f, j.server, j.slot)))
            .any(|(f, s, sl)| sl == slot && (f != file || self.fs_ip(s) != fs))
    }

    fn pick_slot(&self, now: Instant, file: &str, server: usize) -> Option<Slot> {
        let fs = self.fs_ip(server);
        let usable = |slot: Slot| !self.own_use_conflicts(slot, file, fs);
        // Someone already multicasts this file from this file server: share its slot.
        let shared = self.marks.iter().find(|(slot, m)| {
            m.until > now
                && m.file.as_ref().is_some_and(|(f, s)| f == file && *s == fs)
                && usable(**slot)
        });
        if let Some((slot, _)) = shared {
            return Some(*slot);
        }
        let n = self.cfg.slots.len();
        if n == 0 {
            return None;
        }
        let start = (fnv(file) % n as u64) as usize;
        (0..n)
            .map(|i| self.cfg.slots[(start + i) % n])
            .find(|slot| {
                usable(*slot)
                    && self.marks.get(slot).is_none_or(|m| {
                        m.until <= now
                            || m.file.as_ref().is_some_and(|(f, s)| f == file && *s == fs)
                    })
            })
    }

    fn mark(
        &mut self,
        now: Instant,
        slot: Slot,
        file: Option<(String, Ipv4Addr)>,
        until: Instant,
        hint: bool,
    ) {
        if hint
            && self
                .marks
                .get(&slot)
                .is_some_and(|m| !m.hint && m.until > now)
        {
            // A query heard never overrides a live response, NAK or announcement.
            return;
        }
        self.marks.insert(slot, Mark { file, until, hint });
    }

    /// The job for `file` lost its slot: mark it, tell the clients to wait again, clear another.
    fn conflict(
        &mut self,
        now: Instant,
        file: &str,
        by: Ipv4Addr,
        mark: Option<(String, Ipv4Addr)>,
    ) {
        let Some(job) = self.jobs.remove(file) else {
            return;
        };
        let mut mark = mark;
        if let Phase::Preparing { xid, .. } = job.phase {
            // The file server may have registered us already: take it back, and keep the
            // slot blocked for every file until that registration has surely gone.
            self.start_release(now, job.server, job.slot, file, xid);
            mark = None;
        }
        let until = now + self.cfg.used_ttl;
        self.mark(now, job.slot, mark, until, false);
        self.events.push_back(Event::Conflict {
            slot: job.slot,
            file: file.to_string(),
            by,
        });
        for &client in &job.waiters {
            self.events.push_back(Event::Wait {
                client,
                file: file.to_string(),
            });
        }
        self.start_job(now, file, job.server, job.tried, job.waiters);
    }

    /// A datagram on the negotiators' port. `from` is its source; our own multicast looped
    /// back is ignored.
    pub fn handle_peer(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let SocketAddr::V4(from) = from else { return };
        let peer = *from.ip();
        if peer == self.cfg.id {
            return;
        }
        let Some(bytes) = self.open(now, peer, bytes) else { return };
        let Ok(p) = ConflictPacket::parse(bytes) else {
            return;
        };
        let slot = p.slot();
        let theirs = (p.boot_file.clone(), p.file_server);
        let same = |file: &str, fs: Ipv4Addr| file == p.boot_file && fs == p.file_server;
        match p.op {
            ConflictOp::Query => {
                let mut answer = false;
                if let Some((f, a)) = self.active.iter().find(|(_, a)| a.slot == slot) {
                    answer = !same(f, self.fs_ip(a.server));
                }
                let mut lost = None;
                if let Some((f, j)) = self.jobs.iter().find(|(_, j)| j.slot == slot) {
                    if !same(f, self.fs_ip(j.server)) {
                        match j.phase {
                            Phase::Preparing { .. } => answer = true,
                            // Simultaneous clearing of one slot: the lower address wins.
                            Phase::Querying { .. } if self.cfg.id < peer => answer = true,
                            Phase::Querying { .. } => lost = Some(f.clone()),
                        }
                    }
                }
                if answer {
                    if let Ok(bytes) = p.with_op(ConflictOp::Response).encode() {
                        self.queue(from, bytes);
                    }
                } else {
                    let until = now + self.cfg.wait_period * 2;
                    self.mark(now, slot, Some(theirs.clone()), until, true);
                }
                if let Some(f) = lost {
                    self.conflict(now, &f, peer, Some(theirs));
                }
            }
            ConflictOp::Response => {
                // The echo of one of our queries: someone uses the slot for something else.
                let hit = self
                    .jobs
                    .iter()
                    .find(|(f, j)| j.slot == slot && same(f, self.fs_ip(j.server)));
                if let Some((f, _)) = hit {
                    let f = f.clone();
                    self.conflict(now, &f, peer, None);
                }
            }
            ConflictOp::Announce => {
                let until = now + self.cfg.used_ttl;
                self.mark(now, slot, Some(theirs.clone()), until, false);
                let job = self
                    .jobs
                    .iter()
                    .find(|(f, j)| j.slot == slot && !same(f, self.fs_ip(j.server)))
                    .map(|(f, _)| f.clone());
                if let Some(f) = job {
                    self.conflict(now, &f, peer, Some(theirs.clone()));
                }
                // Two live assignments of one slot (only after heavy loss): the higher
                // address withdraws.
                let clash = self
                    .active
                    .iter()
                    .find(|(f, a)| a.slot == slot && !same(f, self.fs_ip(a.server)))
                    .map(|(f, _)| f.clone());
                if let Some(f) = clash {
                    if self.cfg.id > peer {
                        self.withdraw(now, &f, "withdrawn: another negotiator announced the slot");
                    }
                }
            }
        }
    }

    fn withdraw(&mut self, now: Instant, file: &str, reason: &'static str) {
        if let Some(a) = self.active.remove(file) {
            let assignment = self.assignment(file, a.server, a.slot);
            let xid = self.xid();
            self.start_release(now, a.server, a.slot, file, xid);
            self.events
                .push_back(Event::Released { assignment, reason });
            self.requeue(now, file, a.waiters);
        }
    }

    /// Sends DELETE (retried) for a registration we may hold, and keeps the slot marked with
    /// what the file server may still carry until its registration has surely expired: a
    /// PREPARE whose ACKs were all lost, or a DELETE that never arrives, leaves the slot in
    /// use there for up to the registration TTL.
    fn start_release(&mut self, now: Instant, server: usize, slot: Slot, file: &str, xid: u32) {
        let until = now + self.cfg.used_ttl;
        let fs = self.fs_ip(server);
        self.mark(now, slot, Some((file.to_string(), fs)), until, false);
        let msg = FsMessage {
            op: FsOp::Delete,
            xid,
            slot,
            server_port: self.cfg.server_port,
            reason: None,
            boot_file: file.to_string(),
        };
        self.send_fs(server, &msg);
        self.releasing.push(Releasing {
            server,
            msg,
            sent: 1,
            next_send: now + self.cfg.prepare_retry,
        });
    }

    /// A datagram from a file server.
    pub fn handle_file_server(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let SocketAddr::V4(from) = from else { return };
        let Some(bytes) = self.open(now, *from.ip(), bytes) else { return };
        let Ok(m) = FsMessage::parse(bytes) else {
            return;
        };
        let Some(server) = self
            .cfg
            .file_servers
            .iter()
            .position(|s| s.ip() == from.ip())
        else {
            return;
        };
        match m.op {
            FsOp::Deleted => self
                .releasing
                .retain(|r| !(r.server == server && r.msg.xid == m.xid)),
            FsOp::Ack | FsOp::Nak => {
                let job = self.jobs.iter().find(|(f, j)| {
                    j.server == server
                        && **f == m.boot_file
                        && matches!(j.phase, Phase::Preparing { xid, .. } if xid == m.xid)
                });
                if let Some((f, _)) = job {
                    let f = f.clone();
                    return self.prepared(now, &f, m.reason);
                }
                let renewal = self.active.iter_mut().find(|(f, a)| {
                    a.server == server && **f == m.boot_file && a.renew_xid == m.xid
                });
                if let Some((f, a)) = renewal {
                    let f = f.clone();
                    a.unanswered = 0;
                    if m.op == FsOp::Nak {
                        self.withdraw(now, &f, "file server refused the renewal");
                    } else {
                        a.confirmed_at = now;
                        a.next_renew = now + self.cfg.renew_interval;
                        let (server, slot) = (a.server, a.slot);
                        let waiters = std::mem::take(&mut a.waiters);
                        let assignment = self.assignment(&f, server, slot);
                        for client in waiters {
                            let assignment = assignment.clone();
                            self.events.push_back(Event::Ready { client, assignment });
                        }
                    }
                }
            }
            FsOp::Prepare | FsOp::Delete => {}
        }
    }

    fn prepared(&mut self, now: Instant, file: &str, nak: Option<NakReason>) {
        let Some(job) = self.jobs.get(file) else {
            return;
        };
        let (server, slot, tried) = (job.server, job.slot, job.tried);
        match nak {
            None => {
                let job = self.jobs.remove(file).expect("job exists");
                self.withdraw(now, file, "replaced");
                let xid = self.xid();
                self.active.insert(
                    file.to_string(),
                    Active {
                        server,
                        slot,
                        last_used: now,
                        next_announce: now,
                        next_renew: now + self.cfg.renew_interval,
                        renew_xid: xid,
                        unanswered: 0,
                        confirmed_at: now,
                        waiters: Vec::new(),
                    },
                );
                self.announce(file, server, slot);
                if let Some(a) = self.active.get_mut(file) {
                    a.next_announce = now + self.cfg.announce_interval;
                }
                let assignment = self.assignment(file, server, slot);
                self.events.push_back(Event::Activated(assignment.clone()));
                for client in job.waiters {
                    self.events.push_back(Event::Ready {
                        client,
                        assignment: assignment.clone(),
                    });
                }
            }
            Some(NakReason::Busy) => {
                let fs = self.fs_ip(server);
                self.conflict(now, file, fs, None);
            }
            Some(NakReason::NoSuchFile) => self.failover(now, file, tried),
        }
    }

    /// Try the job's file on the next file server, or fail its clients when all were tried.
    fn failover(&mut self, now: Instant, file: &str, tried: usize) {
        let Some(job) = self.jobs.remove(file) else {
            return;
        };
        let n = self.cfg.file_servers.len();
        if tried >= n {
            return self.fail_waiters(file, job.waiters, "no file server has the file");
        }
        for &client in &job.waiters {
            self.events.push_back(Event::Wait {
                client,
                file: file.to_string(),
            });
        }
        let next = (1..n)
            .map(|i| (job.server + i) % n)
            .find(|&s| self.server_up(s, now))
            .unwrap_or((job.server + 1) % n);
        self.start_job(now, file, next, tried + 1, job.waiters);
    }

    fn announce(&mut self, file: &str, server: usize, slot: Slot) {
        if let Ok(bytes) = self.conflict_packet(ConflictOp::Announce, file, server, slot).encode() {
            self.queue_for_peers(bytes);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.marks.retain(|_, m| m.until > now);
        // Clearing and preparing.
        enum Step {
            Prepare,
            Query,
            Resend(u32),
            GiveUp,
        }
        let files: Vec<String> = self.jobs.keys().cloned().collect();
        for file in files {
            let Some(job) = self.jobs.get(&file) else {
                continue;
            };
            let (server, slot, tried) = (job.server, job.slot, job.tried);
            let step = match job.phase {
                Phase::Querying { deadline, .. } if now >= deadline => Step::Prepare,
                Phase::Querying {
                    sent, next_send, ..
                } if now >= next_send && sent < self.cfg.query_tries => Step::Query,
                Phase::Preparing {
                    xid,
                    sent,
                    next_send,
                } if now >= next_send => {
                    if sent >= self.cfg.prepare_tries {
                        Step::GiveUp
                    } else {
                        Step::Resend(xid)
                    }
                }
                _ => continue,
            };
            let gap = self.query_gap();
            let retry = self.cfg.prepare_retry;
            match step {
                Step::Prepare => {
                    let xid = self.xid();
                    let job = self.jobs.get_mut(&file).expect("job");
                    job.phase = Phase::Preparing {
                        xid,
                        sent: 1,
                        next_send: now + retry,
                    };
                    let msg = self.prepare_msg(xid, &file, slot);
                    self.send_fs(server, &msg);
                }
                Step::Query => {
                    if let Some(Job {
                        phase:
                            Phase::Querying {
                                sent, next_send, ..
                            },
                        ..
                    }) = self.jobs.get_mut(&file)
                    {
                        *sent += 1;
                        *next_send += gap;
                    }
                    self.send_query(&file, server, slot);
                }
                Step::Resend(xid) => {
                    if let Some(Job {
                        phase:
                            Phase::Preparing {
                                sent, next_send, ..
                            },
                        ..
                    }) = self.jobs.get_mut(&file)
                    {
                        *sent += 1;
                        *next_send = now + retry;
                    }
                    let msg = self.prepare_msg(xid, &file, slot);
                    self.send_fs(server, &msg);
                }
                Step::GiveUp => {
                    self.down_until[server] = Some(now + self.cfg.server_down_for);
                    if let Some(Phase::Preparing { xid, .. }) =
                        self.jobs.get(&file).map(|j| j.phase.clone())
                    {
                        self.start_release(now, server, slot, &file, xid);
                    }
                    self.failover(now, &file, tried);
                }
            }
        }
        // Active assignments: release when idle, announce, renew.
        let files: Vec<String> = self.active.keys().cloned().collect();
        for file in files {
            let a = self.active[&file].clone();
            if now.saturating_duration_since(a.last_used) >= self.cfg.hold {
                self.withdraw(now, &file, "released: no client asked during the hold time");
                continue;
            }
            if now >= a.next_renew {
                if a.unanswered >= 3 {
                    self.down_until[a.server] = Some(now + self.cfg.server_down_for);
                    self.withdraw(now, &file, "file server stopped answering");
                    continue;
                }
                self.renew(now, &file);
            }
            if now >= a.next_announce {
                self.announce(&file, a.server, a.slot);
                self.active.get_mut(&file).expect("active").next_announce =
                    now + self.cfg.announce_interval;
            }
        }
        // DELETEs not yet confirmed.
        let mut resend = Vec::new();
        self.releasing.retain_mut(|r| {
            if now < r.next_send {
                return true;
            }
            if r.sent >= 4 {
                return false;
            }
            r.sent += 1;
            r.next_send = now + Duration::from_millis(400);
            resend.push((r.server, r.msg.clone()));
            true
        });
        for (server, msg) in resend {
            self.send_fs(server, &msg);
        }
    }

    fn prepare_msg(&self, xid: u32, file: &str, slot: Slot) -> FsMessage {
        FsMessage {
            op: FsOp::Prepare,
            xid,
            slot,
            server_port: self.cfg.server_port,
            reason: None,
            boot_file: file.to_string(),
        }
    }

    /// The earliest time [`handle_timeout`](Self::handle_timeout) has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let jobs = self.jobs.values().map(|j| match j.phase {
            Phase::Querying {
                sent,
                next_send,
                deadline,
            } => {
                if sent < self.cfg.query_tries {
                    next_send.min(deadline)
                } else {
                    deadline
                }
            }
            Phase::Preparing { next_send, .. } => next_send,
        });
        let active = self
            .active
            .values()
            .flat_map(|a| [a.next_announce, a.next_renew, a.last_used + self.cfg.hold]);
        let rel = self.releasing.iter().map(|r| r.next_send);
        let marks = self.marks.values().map(|m| m.until);
        jobs.chain(active).chain(rel).chain(marks).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS0: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    const FS1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

    fn slot(i: u8) -> Slot {
        Slot {
            group: Ipv4Addr::new(239, 0, 0, i),
            port: 1758,
        }
    }

    const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 1), 4012);

    fn neg(last: u8, slots: Vec<Slot>) -> Negotiator {
        Negotiator::new(NegotiatorConfig::new(
            Ipv4Addr::new(10, 0, 0, last),
            slots,
            1759,
            vec![SocketAddrV4::new(FS0, 4013), SocketAddrV4::new(FS1, 4013)],
            vec![GROUP],
        ))
    }

    /// Where a transmit went, as these tests care: the peer group, or one address.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Dest {
        Peers,
        Unicast(SocketAddrV4),
    }

    #[derive(Debug, Clone)]
    struct Sent {
        dest: Dest,
        bytes: Vec<u8>,
    }

    fn peer(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 4012)
    }

    fn drain(n: &mut Negotiator) -> (Vec<Sent>, Vec<Event>) {
        let mut t = Vec::new();
        let mut e = Vec::new();
        let now = Instant::now();
        for (_, x, bytes) in fleetboot_testkit::conformance::drain_checked(1000, |b| n.poll_transmit(now, b).map(|t| ((), t))) {
            let SocketAddr::V4(to) = x.destination else { panic!("{x:?}") };
            let dest = if to == GROUP { Dest::Peers } else { Dest::Unicast(to) };
            t.push(Sent { dest, bytes });
        }
        while let Some(x) = n.poll_event() {
            e.push(x);
        }
        (t, e)
    }

    fn conflict(t: &Sent) -> ConflictPacket {
        ConflictPacket::parse(&t.bytes).unwrap()
    }

    fn fs(t: &Sent) -> FsMessage {
        FsMessage::parse(&t.bytes).unwrap()
    }

    /// Client asks, negotiator queries, nobody answers, PREPARE, ACK: Ready.
    fn activate(n: &mut Negotiator, now: Instant, file: &str) -> (Instant, Assignment) {
        n.request(now, 1, file);
        let (t, e) = drain(n);
        assert!(matches!(e[0], Event::Wait { client: 1, .. }));
        assert_eq!(conflict(&t[0]).op, ConflictOp::Query);
        let mut now;
        let prep = loop {
            now = n.poll_timeout().unwrap();
            n.handle_timeout(now);
            let (t, _) = drain(n);
            if let Some(p) = t.iter().find(|t| matches!(t.dest, Dest::Unicast(_))) {
                break fs(p);
            }
        };
        assert_eq!(prep.op, FsOp::Prepare);
        let ack = prep.reply(FsOp::Ack, None).encode().unwrap();
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &ack);
        let (_, e) = drain(n);
        let a = e
            .iter()
            .find_map(|e| match e {
                Event::Ready { assignment, .. } => Some(assignment.clone()),
                _ => None,
            })
            .expect("ready");
        (now, a)
    }

    /// Negotiators and file servers that share a key: what an attacker sends without it —
    /// from its own address or from a configured peer's — changes nothing and is counted.
    #[test]
    fn with_a_key_spoofed_announce_nak_and_response_are_ignored_and_counted() {
        use crate::auth::{PeerAuth, PeerKey, Refusal, TRAILER_LEN};
        let t0 = Instant::now();
        let key = PeerKey::from_bytes([7; 32]).unwrap();
        let auth = |me: Ipv4Addr| PeerAuth::new(key.clone(), me, t0, 1_800_000_000_000_000);
        let me = Ipv4Addr::new(10, 0, 0, 5);
        let peer2 = Ipv4Addr::new(10, 0, 0, 2);
        let mut cfg = NegotiatorConfig::new(me, vec![slot(1), slot(2)], 1759, vec![SocketAddrV4::new(FS0, 4013)], vec![peer(2)]);
        cfg.auth = Some(auth(me).only_from([peer2, FS0]));
        let mut n = Negotiator::new(cfg);
        let mut fs0 = auth(FS0);
        let mut honest_peer = auth(peer2);
        let mut eve = PeerAuth::new(PeerKey::from_bytes([8; 32]).unwrap(), peer2, t0, 1_800_000_000_000_000);
        let strip = |b: &[u8]| b[..b.len() - TRAILER_LEN].to_vec();

        // Activate "f": the PREPARE goes out signed; the signed ACK is accepted.
        n.request(t0, 1, "f");
        let mut now;
        let prep = loop {
            now = n.poll_timeout().unwrap();
            n.handle_timeout(now);
            let (t, _) = drain(&mut n);
            if let Some(p) = t.iter().find(|t| t.dest == Dest::Unicast(SocketAddrV4::new(FS0, 4013))) {
                break FsMessage::parse(&strip(&p.bytes)).unwrap();
            }
        };
        // An unsigned ACK is not taken for the file server's.
        let ack = prep.reply(FsOp::Ack, None).encode().unwrap();
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &ack);
        assert!(n.assignments().is_empty());
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &fs0.seal(now, ack));
        let held = n.assignments();
        assert_eq!(held.len(), 1);
        drain(&mut n);

        // Spoofed: an announcement of the same slot for another file (which would make this
        // higher address withdraw), a NAK of the renewal, a response to nothing — unsigned
        // from an unknown host, unsigned from the peer's address, and with another key.
        let clash = ConflictPacket {
            op: ConflictOp::Announce,
            file_server: FS0,
            negotiator_type: 0x8000,
            layer: 0,
            group: held[0].slot.group,
            port: held[0].slot.port,
            boot_file: "evil".into(),
        }
        .encode()
        .unwrap();
        let nak = prep.reply(FsOp::Nak, Some(NakReason::Busy)).encode().unwrap();
        let attacker = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 66), 4012);
        n.handle_peer(now, attacker.into(), &clash);
        n.handle_peer(now, peer(2).into(), &clash);
        n.handle_peer(now, peer(2).into(), &eve.seal(now, clash.clone()));
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &nak);
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &eve.seal(now, nak.clone()));
        // A keyed host outside the configured peers.
        let mut outsider = auth(*attacker.ip());
        n.handle_peer(now, attacker.into(), &outsider.seal(now, clash.clone()));
        assert_eq!(n.assignments(), held, "nothing an attacker sent changed the assignment");
        let (t, e) = drain(&mut n);
        assert!(t.is_empty() && e.is_empty(), "{e:?}");
        let r = n.refusals().unwrap();
        assert_eq!(
            [Refusal::Unsigned, Refusal::UnknownPeer, Refusal::BadTag].map(|x| r.get(x)),
            [4, 1, 2],
            "{r:?}"
        );
        // A replay of the file server's genuine ACK is refused too.
        let genuine = fs0.seal(now, prep.reply(FsOp::Ack, None).encode().unwrap());
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &genuine);
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &genuine);
        assert_eq!(n.refusals().unwrap().get(Refusal::Replayed), 1);
        // The same announcement from the real peer, signed: the higher address withdraws.
        n.handle_peer(now, peer(2).into(), &honest_peer.seal(now, clash));
        assert!(n.assignments().is_empty(), "a genuine announcement is obeyed");
    }

    #[test]
    fn clears_for_the_wait_period_then_prepares() {
        let t0 = Instant::now();
        let mut n = neg(1, vec![slot(1)]);
        let (now, a) = activate(&mut n, t0, "f");
        assert!(now - t0 >= n.config().wait_period);
        assert_eq!(a.slot, slot(1));
        assert_eq!(a.file_server, FS0);
        // A second client is answered at once.
        n.request(now, 2, "f");
        assert!(matches!(
            drain(&mut n).1[..],
            [Event::Ready { client: 2, .. }]
        ));
    }

    #[test]
    fn responder_rules() {
        let t0 = Instant::now();
        let mut n = neg(1, vec![slot(1)]);
        let (now, a) = activate(&mut n, t0, "f");
        drain(&mut n);
        let q = |file: &str, fs: Ipv4Addr, s: Slot| {
            ConflictPacket {
                op: ConflictOp::Query,
                file_server: fs,
                negotiator_type: 0x8000,
                layer: 0,
                group: s.group,
                port: s.port,
                boot_file: file.into(),
            }
            .encode()
            .unwrap()
        };
        // Same file from the same file server: silent.
        n.handle_peer(now, peer(2).into(), &q("f", FS0, a.slot));
        assert!(drain(&mut n).0.is_empty());
        // An address it does not use: silent.
        n.handle_peer(now, peer(2).into(), &q("g", FS0, slot(9)));
        assert!(drain(&mut n).0.is_empty());
        // Another file on its address: the query echoed with opcode 1, to the querier.
        let bytes = q("g", FS0, a.slot);
        n.handle_peer(now, peer(2).into(), &bytes);
        let (t, _) = drain(&mut n);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].dest, Dest::Unicast(peer(2)));
        assert_eq!(t[0].bytes[0], 1);
        assert_eq!(t[0].bytes[1..], bytes[1..]);
        // The same file from another file server also conflicts.
        n.handle_peer(now, peer(2).into(), &q("f", FS1, a.slot));
        assert_eq!(drain(&mut n).0.len(), 1);
    }

    #[test]
    fn a_response_marks_the_slot_sends_wait_and_tries_another() {
        let t0 = Instant::now();
        let mut n = neg(1, vec![slot(1), slot(2)]);
        n.request(t0, 7, "f");
        let (t, _) = drain(&mut n);
        let first = conflict(&t[0]);
        let echo = first.with_op(ConflictOp::Response).encode().unwrap();
        n.handle_peer(t0, peer(2).into(), &echo);
        let (t, e) = drain(&mut n);
        assert!(e.iter().any(|e| matches!(e, Event::Conflict { .. })));
        assert!(
            e.iter().any(|e| matches!(e, Event::Wait { client: 7, .. })),
            "another wait"
        );
        let second = conflict(&t[0]);
        assert_eq!(second.op, ConflictOp::Query);
        assert_ne!(second.slot(), first.slot());
    }

    #[test]
    fn simultaneous_queries_lower_address_wins() {
        let t0 = Instant::now();
        let mut low = neg(1, vec![slot(1), slot(2)]);
        let mut high = neg(2, vec![slot(1), slot(2)]);
        // Force both onto the same slot by giving them the same first choice.
        low.request(t0, 1, "f");
        let ql = drain(&mut low).0.remove(0);
        let s = conflict(&ql).slot();
        high.cfg.slots = vec![s, if s == slot(1) { slot(2) } else { slot(1) }];
        let other = (0..)
            .map(|i| format!("other-{i}"))
            .find(|f| fnv(f).is_multiple_of(2))
            .unwrap();
        high.request(t0, 2, &other);
        let qh = drain(&mut high).0.remove(0);
        assert_eq!(conflict(&qh).slot(), s);
        // They cross on the wire.
        low.handle_peer(t0, peer(2).into(), &qh.bytes);
        high.handle_peer(t0, peer(1).into(), &ql.bytes);
        let (tl, _) = drain(&mut low);
        assert_eq!(tl.len(), 1, "the lower one answers");
        assert_eq!(tl[0].bytes[0], 1);
        let (th, eh) = drain(&mut high);
        assert!(eh.iter().any(|e| matches!(e, Event::Conflict { .. })));
        let requery = th
            .iter()
            .map(conflict)
            .find(|p| p.op == ConflictOp::Query)
            .unwrap();
        assert_ne!(requery.slot(), s, "the higher one moves on");
        // The lower one's answer arriving later changes nothing.
        high.handle_peer(t0, peer(1).into(), &tl[0].bytes);
        assert!(drain(&mut high).0.is_empty());
    }

    #[test]
    fn nak_busy_and_no_such_file() {
        let t0 = Instant::now();
        let mut n = neg(1, vec![slot(1), slot(2)]);
        n.request(t0, 1, "f");
        drain(&mut n);
        let mut now;
        let prep = loop {
            now = n.poll_timeout().unwrap();
            n.handle_timeout(now);
            if let Some(p) = drain(&mut n)
                .0
                .iter()
                .filter(|t| matches!(t.dest, Dest::Unicast(_)))
                .map(fs)
                .find(|m| m.op == FsOp::Prepare)
            {
                break p;
            }
        };
        // NAK busy: mark the slot and clear another one on the same file server.
        let nak = prep
            .reply(FsOp::Nak, Some(NakReason::Busy))
            .encode()
            .unwrap();
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &nak);
        let (t, _) = drain(&mut n);
        let q = t
            .iter()
            .filter(|t| t.dest == Dest::Peers)
            .map(conflict)
            .find(|p| p.op == ConflictOp::Query)
            .unwrap();
        assert_ne!(q.slot(), prep.slot);
        assert_eq!(q.file_server, FS0);
        let prep = loop {
            now = n.poll_timeout().unwrap();
            n.handle_timeout(now);
            if let Some(p) = drain(&mut n)
                .0
                .iter()
                .filter(|t| matches!(t.dest, Dest::Unicast(_)))
                .map(fs)
                .find(|m| m.op == FsOp::Prepare)
            {
                break p;
            }
        };
        // NAK no such file: the secondary file server, cleared again.
        let nak = prep
            .reply(FsOp::Nak, Some(NakReason::NoSuchFile))
            .encode()
            .unwrap();
        n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &nak);
        let (t, _) = drain(&mut n);
        let q = t
            .iter()
            .filter(|t| t.dest == Dest::Peers)
            .map(conflict)
            .find(|p| p.op == ConflictOp::Query)
            .unwrap();
        assert_eq!(q.file_server, FS1);
    }

    #[test]
    fn assignments_renew_announce_and_release_when_idle() {
        let t0 = Instant::now();
        let mut n = neg(1, vec![slot(1)]);
        let (mut now, a) = activate(&mut n, t0, "f");
        let (mut renewals, mut announces, mut deletes) = (0, 0, 0);
        let end = now + n.config().hold + Duration::from_secs(1);
        while let Some(t) = n.poll_timeout() {
            if t > end {
                break;
            }
            now = t;
            n.handle_timeout(now);
            for x in drain(&mut n).0 {
                match x.dest {
                    Dest::Peers => {
                        assert_eq!(conflict(&x).op, ConflictOp::Announce);
                        announces += 1;
                    }
                    Dest::Unicast(_) => {
                        let m = fs(&x);
                        match m.op {
                            FsOp::Prepare => {
                                renewals += 1;
                                let ack = m.reply(FsOp::Ack, None).encode().unwrap();
                                n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &ack);
                            }
                            FsOp::Delete => {
                                deletes += 1;
                                assert_eq!(m.slot, a.slot);
                                let d = m.reply(FsOp::Deleted, None).encode().unwrap();
                                n.handle_file_server(now, SocketAddrV4::new(FS0, 4013).into(), &d);
                            }
                            _ => unreachable!(),
                        }
                    }
                }
            }
        }
        assert!(renewals >= 10, "renewals {renewals}");
        assert!(announces >= 10, "announces {announces}");
        assert_eq!(deletes, 1);
        assert!(n.assignments().is_empty());
    }

    /// A client asking after the file server was last heard from is answered only when the
    /// file server confirms; when it stays silent, the client is moved to the next one.
    #[test]
    fn stale_assignments_are_confirmed_before_clients_are_sent_there() {
        let t0 = Instant::now();
        let mut n = neg(1, vec![slot(1), slot(2)]);
        let (now, a) = activate(&mut n, t0, "f");
        assert_eq!(a.file_server, FS0);
        // Fresh: answered at once.
        n.request(now, 2, "f");
        let (t, e) = drain(&mut n);
        assert!(t.is_empty());
        assert!(matches!(&e[..], [Event::Ready { client: 2, .. }]));

        // Stale: a wait packet and a PREPARE to the file server; the ACK answers.
        let later = now + n.config().confirm_within + Duration::from_millis(1);
        n.request(later, 3, "f");
        let (t, e) = drain(&mut n);
        assert!(matches!(&e[..], [Event::Wait { client: 3, .. }]));
        let prep = fs(&t[0]);
        assert_eq!((prep.op, t[0].dest), (FsOp::Prepare, Dest::Unicast(SocketAddrV4::new(FS0, 4013))));
        n.request(later, 4, "f"); // joins the same confirmation
        let (t, e) = drain(&mut n);
        assert!(t.is_empty() && matches!(&e[..], [Event::Wait { client: 4, .. }]));
        let ack = prep.reply(FsOp::Ack, None).encode().unwrap();
        n.handle_file_server(later, SocketAddrV4::new(FS0, 4013).into(), &ack);
        let (_, e) = drain(&mut n);
        let ready: Vec<ClientToken> = e
            .iter()
            .filter_map(|e| match e {
                Event::Ready { client, assignment } if assignment.file_server == FS0 => Some(*client),
                _ => None,
            })
            .collect();
        assert_eq!(ready, [3, 4]);

        // The file server dies: the next stale request is not sent there. After the
        // unanswered retries the assignment is withdrawn and the client waits on a new
        // one at the second file server.
        let mut now = later + n.config().confirm_within + Duration::from_millis(1);
        n.request(now, 5, "f");
        let (_, e) = drain(&mut n);
        assert!(matches!(&e[..], [Event::Wait { client: 5, .. }]));
        let deadline = now + Duration::from_secs(10);
        let answer = loop {
            now = n.poll_timeout().unwrap();
            assert!(now < deadline, "client 5 never answered");
            n.handle_timeout(now);
            let (t, e) = drain(&mut n);
            assert!(!e.iter().any(|e| matches!(e, Event::Ready { assignment, .. } if assignment.file_server == FS0)));
            for x in &t {
                if x.dest == Dest::Unicast(SocketAddrV4::new(FS1, 4013)) {
                    let m = fs(x);
                    if m.op == FsOp::Prepare {
                        let ack = m.reply(FsOp::Ack, None).encode().unwrap();
                        n.handle_file_server(now, SocketAddrV4::new(FS1, 4013).into(), &ack);
                    }
                }
            }
            let (_, e2) = drain(&mut n);
            if let Some(a) = e.iter().chain(&e2).find_map(|e| match e {
                Event::Ready { client: 5, assignment } => Some(assignment.clone()),
                _ => None,
            }) {
                break a;
            }
        };
        assert_eq!(answer.file_server, FS1);
        assert_ne!(answer.slot, a.slot, "the dead server's slot stays marked until it expires");
        assert!(now - later < Duration::from_secs(5), "took {:?}", now - later);
    }
}

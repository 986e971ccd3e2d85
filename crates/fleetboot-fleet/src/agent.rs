//! The node agent, sans-I/O: one boot of a node, from its local storage to running.
//!
//! The shell (`fleetboot agent node`, or the emulator running hundreds of these) reads
//! the local disk — re-hashing every stored file, so corruption shows — and creates an
//! [`Agent`] per boot; it carries out the [`Action`]s and feeds back what happened. A
//! reboot is the end of one agent and the start of the next, from what was stored.
//!
//! - pristine (nothing stored): ask for image and packages → fetch → store → reboot;
//! - stored: ask the master to verify → match: run from local storage, nothing fetched;
//!   mismatch: fetch only what differs, store, run (reboot first if the image changed);
//! - test mode: fetch what differs into volatile memory, run without storing;
//! - while running (`stay`): heartbeat; a prepare campaign's orders reset the node
//!   (wipe storage, reboot pristine) or warm-boot it (reboot, validate).

use crate::model::{FileEntry, Kind, Sha256};
use crate::protocol::{AgentMessage, Identity, Installed, NodeReport, Order, Plan, Reply, SignedReply, Verdict};
use crate::version::Version;
use serde::Serialize;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub identity: Identity,
    /// Ask for packages by these features (empty: by the node's configuration).
    pub features: Vec<String>,
    /// Keep running after boot: heartbeat and obey orders. Otherwise end once running.
    pub stay: bool,
    pub heartbeat_ms: u64,
    pub retry_ms: u64,
    /// Transport errors and retryable refusals tolerated in a row.
    pub max_retries: u32,
    /// Downloads of one blob that may fail their hash check before the boot fails.
    pub max_fetch_tries: u32,
}

impl AgentConfig {
    pub fn new(identity: Identity) -> AgentConfig {
        AgentConfig { identity, features: Vec::new(), stay: false, heartbeat_ms: 10_000, retry_ms: 2_000, max_retries: 30, max_fetch_tries: 3 }
    }
}

/// What the node has on its local disk at boot.
#[derive(Debug, Clone, Default)]
pub struct Local {
    /// The stored set, with each file's hash as read now.
    pub stored: Vec<Installed>,
    /// The master's public key, pinned at first contact.
    pub master_key: Option<String>,
}

/// A package to run, with its files (the shell finds each blob in volatile memory first,
/// then in local storage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunItem {
    pub name: String,
    pub version: Version,
    pub kind: Kind,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Sign and send; answer with [`Agent::on_reply`] or [`Agent::on_transport_error`].
    Send(AgentMessage),
    /// Download a blob (into storage, or volatile memory for test mode) while hashing it;
    /// answer with [`Agent::on_fetched`].
    Fetch { file: FileEntry, volatile: bool },
    /// Make this the stored set (atomically; blobs it does not use may go).
    Store(Vec<Installed>),
    /// Remember the master's key.
    PinMasterKey(String),
    /// Boot these, in order: the image first, then packages, dependencies first.
    Run(Vec<RunItem>),
    /// Forget everything stored (a prepare campaign's reset).
    Wipe,
    /// End this boot; the next starts from what is stored.
    Reboot,
    /// Call [`Agent::on_timer`] at this time.
    Wait { until_ms: u64 },
    /// This boot is over.
    Exit { ok: bool, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Awaiting {
    Boot,
    /// Storing or running after a plan; then what to do next.
    Report(Next),
    Heartbeat,
}

#[derive(Debug, Clone, PartialEq)]
enum Next {
    Reboot,
    Run(Vec<RunItem>),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// A request is out (or waiting to be retried).
    Asking { awaiting: Awaiting, message: AgentMessage, retries: u32 },
    Fetching { plan: Plan, queue: VecDeque<FileEntry>, tries: u32 },
    /// Running; heartbeat at the next timer.
    Running,
    Done,
}

/// What a boot did, for the shell's report and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BootSummary {
    pub verdict: Option<Verdict>,
    pub fetched_files: u64,
    pub fetched_bytes: u64,
    pub refetched: u64,
    pub ran: Vec<String>,
}

pub struct Agent {
    config: AgentConfig,
    local: Local,
    state: State,
    /// Plans given up because their downloads failed (not their hashes): bounded by
    /// `max_retries`.
    replans: u32,
    pub summary: BootSummary,
}

fn run_items<'a>(set: impl Iterator<Item = &'a crate::select::Chosen>) -> Vec<RunItem> {
    set.map(|c| RunItem { name: c.name.clone(), version: c.version.clone(), kind: c.kind, files: c.files.clone() }).collect()
}

impl Agent {
    /// One boot: returns the agent and its first actions.
    pub fn boot(config: AgentConfig, local: Local) -> (Agent, Vec<Action>) {
        let message = AgentMessage::Boot { identity: config.identity.clone(), features: config.features.clone(), installed: local.stored.clone() };
        let agent = Agent {
            config,
            local,
            state: State::Asking { awaiting: Awaiting::Boot, message: message.clone(), retries: 0 },
            replans: 0,
            summary: BootSummary::default(),
        };
        (agent, vec![Action::Send(message)])
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn exit(&mut self, ok: bool, reason: impl Into<String>) -> Vec<Action> {
        self.state = State::Done;
        vec![Action::Exit { ok, reason: reason.into() }]
    }

    fn ask(&mut self, awaiting: Awaiting, message: AgentMessage) -> Vec<Action> {
        self.state = State::Asking { awaiting, message: message.clone(), retries: 0 };
        vec![Action::Send(message)]
    }

    fn retry_later(&mut self, now_ms: u64, why: &str) -> Vec<Action> {
        if let State::Asking { retries, .. } = &mut self.state {
            *retries += 1;
            if *retries > self.config.max_retries {
                return self.exit(false, format!("gave up after {} tries: {why}", self.config.max_retries));
            }
            return vec![Action::Wait { until_ms: now_ms + self.config.retry_ms }];
        }
        Vec::new()
    }

    /// The request could not be delivered or its reply not read.
    pub fn on_transport_error(&mut self, error: &str, now_ms: u64) -> Vec<Action> {
        self.retry_later(now_ms, error)
    }

    /// A signed reply to the request sent with `nonce`.
    pub fn on_reply(&mut self, signed: &SignedReply, nonce: &str, now_ms: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let key = match &self.local.master_key {
            Some(k) => k.clone(),
            None => {
                // First contact: trust the master that answers, from now on only it.
                self.local.master_key = Some(signed.key.clone());
                actions.push(Action::PinMasterKey(signed.key.clone()));
                signed.key.clone()
            }
        };
        let reply = match signed.open(&key, nonce) {
            Ok(r) => r,
            Err(e) => {
                actions.extend(self.retry_later(now_ms, &e));
                return actions;
            }
        };
        actions.extend(self.on_verified_reply(reply, now_ms));
        actions
    }

    fn on_verified_reply(&mut self, reply: Reply, now_ms: u64) -> Vec<Action> {
        let State::Asking { awaiting, .. } = &self.state else { return Vec::new() };
        let awaiting = awaiting.clone();
        match (awaiting, reply) {
            (_, Reply::Refused { reason, retry: true }) => self.retry_later(now_ms, &reason),
            (_, Reply::Refused { reason, retry: false }) => self.exit(false, format!("the master refused: {reason}")),
            (Awaiting::Boot, Reply::Plan(plan)) => self.start_plan(plan),
            (Awaiting::Report(next), Reply::Ack) => match next {
                Next::Reboot => {
                    self.state = State::Done;
                    vec![Action::Reboot]
                }
                Next::Run(items) => self.run(items, now_ms),
            },
            (Awaiting::Heartbeat, Reply::Orders(order)) => match order {
                Order::None => {
                    self.state = State::Running;
                    vec![Action::Wait { until_ms: now_ms + self.config.heartbeat_ms }]
                }
                Order::Reset { .. } => {
                    self.state = State::Done;
                    vec![Action::Wipe, Action::Reboot]
                }
                Order::Reboot { .. } => {
                    self.state = State::Done;
                    vec![Action::Reboot]
                }
            },
            (_, other) => self.exit(false, format!("unexpected reply from the master: {other:?}")),
        }
    }

    fn start_plan(&mut self, plan: Plan) -> Vec<Action> {
        self.summary.verdict = Some(plan.verdict);
        // A plan is only what the master says; still refuse one that would not be intact.
        if plan.fetch.iter().any(|f| !plan.set().any(|c| c.files.iter().any(|x| x.sha256 == f.sha256))) {
            return self.exit(false, "the master's plan fetches a blob outside its own set");
        }
        let queue: VecDeque<FileEntry> = plan.fetch.iter().cloned().collect();
        self.state = State::Fetching { plan, queue, tries: 0 };
        self.next_fetch()
    }

    fn next_fetch(&mut self) -> Vec<Action> {
        let State::Fetching { plan, queue, .. } = &self.state else { return Vec::new() };
        if let Some(f) = queue.front() {
            return vec![Action::Fetch { file: f.clone(), volatile: !plan.store }];
        }
        let plan = plan.clone();
        let set: Vec<Installed> = plan.set().map(Installed::from_chosen).collect();
        let items = run_items(plan.set());
        match plan.verdict {
            Verdict::Match => self.run(items, 0),
            Verdict::Test => {
                let report = AgentMessage::Report { state: NodeReport::Running, test: true, installed: set };
                let mut a = vec![];
                a.extend(self.ask(Awaiting::Report(Next::Run(items)), report));
                a
            }
            Verdict::Install | Verdict::Update => {
                let next = if plan.reboot { Next::Reboot } else { Next::Run(items) };
                let report = AgentMessage::Report { state: NodeReport::Stored, test: false, installed: set.clone() };
                let mut a = vec![Action::Store(set)];
                a.extend(self.ask(Awaiting::Report(next), report));
                a
            }
        }
    }

    /// A blob was downloaded and hashed (`Err`: the download failed).
    pub fn on_fetched(&mut self, expected: &Sha256, got: Result<(Sha256, u64), String>, now_ms: u64) -> Vec<Action> {
        let max = self.config.max_fetch_tries;
        let State::Fetching { queue, tries, .. } = &mut self.state else { return Vec::new() };
        let Some(front) = queue.front() else { return Vec::new() };
        if front.sha256 != *expected {
            return Vec::new();
        }
        match got {
            Ok((sha, size)) if sha == *expected && size == front.size => {
                self.summary.fetched_files += 1;
                self.summary.fetched_bytes += size;
                queue.pop_front();
                *tries = 0;
                self.next_fetch()
            }
            other => {
                *tries += 1;
                self.summary.refetched += 1;
                if *tries >= max {
                    let error = match other {
                        Ok((sha, _)) => return self.exit(false, format!("blob {expected} arrived as {sha} {max} times")),
                        Err(e) => e,
                    };
                    // The download itself failed (not its hash): the master that made
                    // the plan may be gone, and the one that took over knows nothing of
                    // it. Ask again for a plan, later.
                    self.replans += 1;
                    if self.replans > self.config.max_retries {
                        return self.exit(false, format!("blob {expected}: {error}"));
                    }
                    let message = AgentMessage::Boot {
                        identity: self.config.identity.clone(),
                        features: self.config.features.clone(),
                        installed: self.local.stored.clone(),
                    };
                    self.state = State::Asking { awaiting: Awaiting::Boot, message, retries: 0 };
                    return vec![Action::Wait { until_ms: now_ms + self.config.retry_ms }];
                }
                self.next_fetch()
            }
        }
    }

    fn run(&mut self, items: Vec<RunItem>, now_ms: u64) -> Vec<Action> {
        self.summary.ran = items.iter().map(|i| format!("{} {}", i.name, i.version)).collect();
        let mut a = vec![Action::Run(items)];
        if self.config.stay {
            self.state = State::Running;
            a.push(Action::Wait { until_ms: now_ms + self.config.heartbeat_ms });
        } else {
            self.state = State::Done;
            a.push(Action::Exit { ok: true, reason: "running".into() });
        }
        a
    }

    /// The time asked for with [`Action::Wait`] has come.
    pub fn on_timer(&mut self, _now_ms: u64) -> Vec<Action> {
        match &self.state {
            State::Asking { message, .. } => vec![Action::Send(message.clone())],
            State::Running => self.ask(Awaiting::Heartbeat, AgentMessage::Heartbeat),
            _ => Vec::new(),
        }
    }
}

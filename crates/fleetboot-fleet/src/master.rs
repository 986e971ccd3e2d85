//! The master, sans-I/O: signed requests in (with `now`), replies and the writes that must
//! be durable before the reply is sent out.
//!
//! It holds the configuration ([`FleetDb`], reloaded by the shell when the store's
//! revision moves), what each node last reported ([`NodeState`]), which blobs each node
//! may download right now (what its last plan told it to fetch), per-node counters, and
//! the prepare campaigns ("prepare all nodes now": reset, serve, wait for "stored", then a
//! warm boot in which nodes only validate).

use crate::model::{Change, FileEntry, FleetDb, Kind, Node, Pin, Sha256};
use crate::protocol::{AgentMessage, Envelope, Installed, NodeReport, Order, Plan, Reply, Verdict, MAX_BODY};
use crate::select::{self, Chosen, Selection, Want};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enroll {
    /// The first key a configured node presents becomes its identity.
    TrustFirstUse,
    /// A node's first key waits for `fleetboot node approve`.
    Approve,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub enroll: Enroll,
    /// Unknown MACs: refused (None), or registered into this class ("" for none) from the
    /// type, arch and location they report.
    pub register_unknown: Option<String>,
    pub max_clock_skew_ms: u64,
    /// Agents heartbeat this often; a node unseen for three periods is absent.
    pub heartbeat_ms: u64,
    /// Bound on the node database when unknown nodes register themselves.
    pub max_nodes: usize,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy { enroll: Enroll::TrustFirstUse, register_unknown: None, max_clock_skew_ms: 300_000, heartbeat_ms: 10_000, max_nodes: 10_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Unknown,
    /// Sent a plan; downloading.
    Installing,
    /// Reported its set stored.
    Stored,
    Running,
    /// Running test packages it did not store.
    Testing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledSummary {
    pub name: String,
    pub version: crate::Version,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationSummary {
    pub ts_ms: u64,
    /// `install`, `match`, `update`, `test` or `refused`.
    pub result: String,
    pub fetch_files: usize,
    pub fetch_bytes: u64,
}

/// What the master knows of a node beyond its configuration; persisted (fenced).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeState {
    /// A key awaiting an operator's approval (`fleetboot node approve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_key: Option<String>,
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub installed: Vec<InstalledSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<VerificationSummary>,
}

/// Bytes and exchanges per node, since the master started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Counters {
    pub image_bytes: u64,
    pub package_bytes: u64,
    pub blobs_served: u64,
    pub boots: u64,
    pub verifications: u64,
    pub matches: u64,
    pub updates: u64,
    pub installs: u64,
    pub tests: u64,
    pub refusals: u64,
}

// ---- prepare campaigns ------------------------------------------------------------------

/// An operator's "prepare all nodes now" (configuration, written by the CLI/API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    pub started_ms: u64,
    /// For each stage: nodes that have not made it by then are reported and left out.
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Preparing,
    WarmBoot,
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrepState {
    ResetOrdered,
    Resetting,
    Stored,
    TimedOut,
    RebootOrdered,
    Rebooting,
    /// Warm boot: verified with no download.
    Validated,
    /// Warm boot: had to download what differed.
    Updated,
    Failed(String),
}

impl PrepState {
    pub fn label(&self) -> &'static str {
        match self {
            PrepState::ResetOrdered => "reset_ordered",
            PrepState::Resetting => "resetting",
            PrepState::Stored => "stored",
            PrepState::TimedOut => "timed_out",
            PrepState::RebootOrdered => "reboot_ordered",
            PrepState::Rebooting => "rebooting",
            PrepState::Validated => "validated",
            PrepState::Updated => "updated",
            PrepState::Failed(_) => "failed",
        }
    }
}

/// A campaign's progress (master state, written by the master).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub spec: CampaignSpec,
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_boot_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    pub nodes: BTreeMap<String, PrepState>,
}

impl Campaign {
    /// How many nodes are in each state.
    pub fn tally(&self) -> BTreeMap<&'static str, usize> {
        let mut t = BTreeMap::new();
        for s in self.nodes.values() {
            *t.entry(s.label()).or_insert(0) += 1;
        }
        t
    }
}

// ---- the machine ------------------------------------------------------------------------

/// A write the shell makes durable before sending the reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    NodeState { node: String, state: NodeState },
    Verification { ts_ms: u64, node: String, result: String, detail: serde_json::Value },
    /// A node registered itself (configuration change).
    Config(Change),
    Campaign(Campaign),
}

/// The reply to send, with its HTTP status, and the writes to make durable first.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: u16,
    pub reply: Reply,
    pub writes: Vec<Write>,
}

impl Outcome {
    fn refused(status: u16, reason: impl Into<String>, retry: bool) -> Outcome {
        Outcome { status, reply: Reply::Refused { reason: reason.into(), retry }, writes: Vec::new() }
    }
}

/// Why a blob download was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobRefusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("blob {0} is not part of what this node was told to fetch")]
    NotOffered(Sha256),
}

/// How stale a persisted "last seen" may get when nothing else about the node changes.
const SEEN_PERSIST_MS: u64 = 60_000;

/// Bound on the master's own configuration changes awaiting confirmation.
const MAX_UNCONFIRMED: usize = 10_000;

/// Nonces remembered per node (replays inside the clock-skew window are refused).
const NONCES_PER_NODE: usize = 256;

pub struct Master {
    policy: Policy,
    db: FleetDb,
    states: BTreeMap<String, NodeState>,
    nonces: BTreeMap<String, VecDeque<String>>,
    /// node → blobs it may download now, with their kind.
    offers: BTreeMap<String, BTreeMap<Sha256, (u64, Kind)>>,
    counters: BTreeMap<String, Counters>,
    campaigns: BTreeMap<String, Campaign>,
    /// When each node's state was last written (for heartbeats that change nothing else).
    seen_persisted: BTreeMap<String, u64>,
    /// Configuration changes this master made (enrolments, registrations) that a reload
    /// from the store may not have yet: applied again on top of it. Each carries the
    /// generation at which the shell confirmed it durable; a reload whose read of the store
    /// began after that has it, and drops it.
    unconfirmed: Vec<(Change, Option<u64>)>,
    generation: u64,
}

impl Master {
    pub fn new(policy: Policy, db: FleetDb, states: BTreeMap<String, NodeState>, campaigns: Vec<Campaign>) -> Master {
        Master {
            policy,
            db,
            states,
            nonces: BTreeMap::new(),
            offers: BTreeMap::new(),
            counters: BTreeMap::new(),
            seen_persisted: BTreeMap::new(),
            unconfirmed: Vec::new(),
            generation: 0,
            campaigns: campaigns.into_iter().map(|c| (c.spec.id.clone(), c)).collect(),
        }
    }

    pub fn db(&self) -> &FleetDb {
        &self.db
    }

    pub fn states(&self) -> &BTreeMap<String, NodeState> {
        &self.states
    }

    pub fn counters(&self) -> &BTreeMap<String, Counters> {
        &self.counters
    }

    pub fn campaigns(&self) -> &BTreeMap<String, Campaign> {
        &self.campaigns
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether a node was heard from within three heartbeat periods.
    pub fn present(&self, node: &str, now_ms: u64) -> bool {
        self.states.get(node).is_some_and(|s| s.last_seen_ms > 0 && now_ms.saturating_sub(s.last_seen_ms) <= 3 * self.policy.heartbeat_ms)
    }

    /// The configuration changed under the master (an operator's import, CLI or API
    /// change): take the new database and start any new campaign. Returns the writes.
    /// `read_generation`: [`Master::generation`] taken before the store was read.
    pub fn reload(&mut self, mut db: FleetDb, specs: Vec<CampaignSpec>, now_ms: u64, read_generation: u64) -> Vec<Write> {
        self.unconfirmed.retain(|(_, confirmed)| confirmed.is_none_or(|g| g > read_generation));
        for (c, _) in &self.unconfirmed {
            // An operator's change made meanwhile (another node on that MAC, a key set or
            // forgotten) stands over the master's own.
            if let Change::PutNode(n) = c {
                let taken = db.node_by_mac(&n.mac).is_some_and(|o| o.name != n.name);
                let keyed = db.nodes.get(&n.name).is_some_and(|o| o.key.is_some() && o.key != n.key);
                if taken || keyed {
                    continue;
                }
            }
            let _ = db.apply(c);
        }
        self.db = db;
        self.states.retain(|name, _| self.db.nodes.contains_key(name));
        self.seen_persisted.retain(|name, _| self.db.nodes.contains_key(name));
        self.counters.retain(|name, _| self.db.nodes.contains_key(name));
        self.nonces.retain(|name, _| self.db.nodes.contains_key(name));
        self.offers.retain(|name, _| self.db.nodes.contains_key(name));
        let mut writes = Vec::new();
        for spec in specs {
            if self.campaigns.contains_key(&spec.id) {
                continue;
            }
            // A newer campaign supersedes any still running.
            for old in self.campaigns.values_mut().filter(|c| c.stage != Stage::Done) {
                old.stage = Stage::Done;
                old.finished_ms = Some(now_ms);
                writes.push(Write::Campaign(old.clone()));
            }
            let nodes = self
                .db
                .nodes
                .values()
                .filter(|n| spec.class.is_none() || n.class == spec.class)
                .map(|n| (n.name.clone(), PrepState::ResetOrdered))
                .collect();
            let c = Campaign { spec: spec.clone(), stage: Stage::Preparing, warm_boot_ms: None, finished_ms: None, nodes };
            writes.push(Write::Campaign(c.clone()));
            self.campaigns.insert(spec.id, c);
        }
        writes.extend(self.tick(now_ms));
        writes
    }

    fn active_campaign(&mut self, node: &str) -> Option<(&mut Campaign, PrepState)> {
        self.campaigns
            .values_mut()
            .filter(|c| c.stage != Stage::Done)
            .find_map(|c| c.nodes.get(node).cloned().map(|s| (c, s)))
    }

    fn set_prep(&mut self, node: &str, state: PrepState, writes: &mut Vec<Write>) {
        if let Some((c, _)) = self.active_campaign(node) {
            c.nodes.insert(node.to_string(), state);
            writes.push(Write::Campaign(c.clone()));
        }
    }

    /// Deadlines and stage changes of the prepare campaigns.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Write> {
        let mut writes = Vec::new();
        for c in self.campaigns.values_mut() {
            let before = c.clone();
            match c.stage {
                Stage::Preparing => {
                    let settled = c.nodes.values().all(|s| matches!(s, PrepState::Stored | PrepState::TimedOut | PrepState::Failed(_)));
                    if settled || now_ms >= c.spec.started_ms.saturating_add(c.spec.deadline_ms) {
                        for s in c.nodes.values_mut() {
                            *s = match s {
                                PrepState::Stored => PrepState::RebootOrdered,
                                PrepState::Failed(r) => PrepState::Failed(r.clone()),
                                _ => PrepState::TimedOut,
                            };
                        }
                        c.stage = Stage::WarmBoot;
                        c.warm_boot_ms = Some(now_ms);
                    }
                }
                Stage::WarmBoot => {
                    let settled = c.nodes.values().all(|s| {
                        matches!(s, PrepState::Validated | PrepState::Updated | PrepState::TimedOut | PrepState::Failed(_))
                    });
                    let late = now_ms >= c.warm_boot_ms.unwrap_or(now_ms).saturating_add(c.spec.deadline_ms);
                    if settled || late {
                        for s in c.nodes.values_mut() {
                            if matches!(s, PrepState::RebootOrdered | PrepState::Rebooting) {
                                *s = PrepState::Failed("did not validate before the deadline".into());
                            }
                        }
                        c.stage = Stage::Done;
                        c.finished_ms = Some(now_ms);
                    }
                }
                Stage::Done => {}
            }
            if *c != before {
                writes.push(Write::Campaign(c.clone()));
            }
        }
        writes
    }

    /// Checks the envelope (signature, clock, replay, the node and its key). On success:
    /// the node's name; else the refusal to send (built once per refused request).
    #[allow(clippy::result_large_err)]
    fn authenticate(&mut self, env: &Envelope, now_ms: u64, writes: &mut Vec<Write>, identity: Option<&crate::protocol::Identity>) -> Result<String, Outcome> {
        if env.body.len() > MAX_BODY || env.nonce.len() != 32 || !env.nonce.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Outcome::refused(400, "malformed request", false));
        }
        if !env.verifies() {
            return Err(Outcome::refused(401, "the request's signature does not verify", false));
        }
        if env.ts_ms.abs_diff(now_ms) > self.policy.max_clock_skew_ms {
            return Err(Outcome::refused(401, format!("the request's clock is {} ms off the master's", env.ts_ms.abs_diff(now_ms)), true));
        }
        let name = match self.db.node_by_mac(&env.node) {
            Some(n) => n.name.clone(),
            None => match (&self.policy.register_unknown, identity) {
                (Some(class), Some(id)) if id.mac == env.node => {
                    if self.db.nodes.len() >= self.policy.max_nodes {
                        return Err(Outcome::refused(403, format!("the node database is full ({} nodes)", self.policy.max_nodes), true));
                    }
                    let node = Node {
                        name: format!("node-{}", env.node.hyphenated()),
                        mac: env.node,
                        uuid: id.uuid.clone(),
                        node_type: id.node_type.clone(),
                        arch: id.arch.clone(),
                        location: id.location.clone(),
                        class: (!class.is_empty()).then(|| class.clone()),
                        features: vec![],
                        image: None,
                        image_version: Pin::Latest,
                        packages: BTreeMap::new(),
                        test: None,
                        key: None,
                    };
                    let change = Change::PutNode(node.clone());
                    if let Err(e) = self.db.apply(&change) {
                        return Err(Outcome::refused(403, format!("cannot register node {}: {e}", env.node), false));
                    }
                    self.remember_unconfirmed(change.clone());
                    writes.push(Write::Config(change));
                    node.name
                }
                _ => return Err(Outcome::refused(403, format!("unknown node {}: add it to the node database (fleetboot node add)", env.node), true)),
            },
        };
        let key = env.key.to_ascii_lowercase();
        let configured = self.db.nodes.get(&name).and_then(|n| n.key.clone());
        match configured {
            Some(k) if k != key => {
                return Err(Outcome::refused(
                    403,
                    format!("node {name} presented a key other than the one it enrolled with; if it was reinstalled: fleetboot node forget-key {name}"),
                    false,
                ));
            }
            Some(_) => {}
            None if self.policy.enroll == Enroll::TrustFirstUse => {
                // The binding is configuration: visible, replicated, revocable.
                let mut node = self.db.nodes[&name].clone();
                node.key = Some(key);
                let change = Change::PutNode(node);
                if let Err(e) = self.db.apply(&change) {
                    return Err(Outcome::refused(500, format!("cannot enroll node {name}: {e}"), true));
                }
                self.remember_unconfirmed(change.clone());
                writes.push(Write::Config(change));
            }
            None => {
                let state = self.states.entry(name.clone()).or_default();
                if state.pending_key.as_deref() != Some(key.as_str()) {
                    state.pending_key = Some(key);
                    writes.push(Write::NodeState { node: name.clone(), state: state.clone() });
                }
                return Err(Outcome {
                    writes: std::mem::take(writes),
                    ..Outcome::refused(403, format!("node {name} awaits approval: fleetboot node approve {name}"), true)
                });
            }
        }
        let seen = self.nonces.entry(name.clone()).or_default();
        if seen.contains(&env.nonce) {
            return Err(Outcome::refused(401, "replayed request (nonce seen before)", false));
        }
        if seen.len() >= NONCES_PER_NODE {
            seen.pop_front();
        }
        seen.push_back(env.nonce.clone());
        Ok(name)
    }

    fn remember_unconfirmed(&mut self, change: Change) {
        // A write that failed is never confirmed; its node asks again and is registered
        // anew, so the oldest entries are the ones to let go.
        if self.unconfirmed.len() >= MAX_UNCONFIRMED {
            self.unconfirmed.remove(0);
        }
        self.unconfirmed.push((change, None));
    }

    /// Counts confirmations; see [`Master::reload`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The shell made these writes durable: their configuration changes are in the store.
    pub fn confirm(&mut self, writes: &[Write]) {
        self.generation += 1;
        for w in writes {
            if let Write::Config(c) = w {
                if let Some(u) = self.unconfirmed.iter_mut().find(|(u, g)| u == c && g.is_none()) {
                    u.1 = Some(self.generation);
                }
            }
        }
    }

    /// Handles one signed request.
    pub fn handle(&mut self, env: &Envelope, now_ms: u64) -> Outcome {
        let msg: AgentMessage = match serde_json::from_str(&env.body) {
            Ok(m) => m,
            Err(e) => return Outcome::refused(400, format!("request body: {e}"), false),
        };
        let mut writes = Vec::new();
        let identity = match &msg {
            AgentMessage::Boot { identity, .. } => Some(identity),
            _ => None,
        };
        let name = match self.authenticate(env, now_ms, &mut writes, identity) {
            Ok(n) => n,
            Err(mut o) => {
                o.writes.append(&mut writes);
                return o;
            }
        };
        let before = self.states.get(&name).cloned().unwrap_or_default();
        self.states.entry(name.clone()).or_default().last_seen_ms = now_ms;
        let mut out = match msg {
            AgentMessage::Boot { identity, features, installed } => self.boot(&name, &identity, &features, &installed, now_ms),
            AgentMessage::Report { state, test, installed } => self.report(&name, state, test, &installed),
            AgentMessage::Heartbeat => self.heartbeat(&name),
        };
        let state = self.states.get(&name).cloned().unwrap_or_default();
        writes.append(&mut out.writes);
        // A heartbeat that changes nothing but "last seen" is not worth an fsync each
        // time: that is persisted once a minute per node.
        let only_seen = NodeState { last_seen_ms: before.last_seen_ms, ..state.clone() } == before;
        let persisted = self.seen_persisted.get(&name).copied().unwrap_or(0);
        if !only_seen || now_ms.saturating_sub(persisted) >= SEEN_PERSIST_MS || writes.iter().any(|w| matches!(w, Write::NodeState { .. })) {
            writes.retain(|w| !matches!(w, Write::NodeState { .. }));
            self.seen_persisted.insert(name.clone(), now_ms);
            writes.push(Write::NodeState { node: name, state });
        }
        out.writes = writes;
        out
    }

    fn boot(&mut self, name: &str, identity: &crate::protocol::Identity, features: &[String], installed: &[Installed], now_ms: u64) -> Outcome {
        let mut writes = Vec::new();
        let node = self.db.nodes.get(name).cloned().expect("authenticated nodes exist");
        if identity.node_type != node.node_type || identity.arch != node.arch {
            // The database is authoritative; a card in the wrong slot is worth a log line.
            writes.push(Write::Verification {
                ts_ms: now_ms,
                node: name.into(),
                result: "note".into(),
                detail: serde_json::json!({"reported_type": identity.node_type, "reported_arch": identity.arch, "configured_type": node.node_type, "configured_arch": node.arch}),
            });
        }
        let want = if features.is_empty() { Want::Configured } else { Want::Features(features) };
        let selected = match select::select_test(&self.db, &node, want) {
            Ok(Some(t)) => Ok((t, true)),
            Ok(None) => select::select(&self.db, &node, want).map(|s| (s, false)),
            Err(e) => Err(e),
        };
        let prep = self.active_campaign(name).map(|(_, s)| s);
        let counters = self.counters.entry(name.to_string()).or_default();
        counters.boots += 1;
        let (selection, test) = match selected {
            Ok(s) => s,
            Err(e) => {
                counters.refusals += 1;
                writes.push(Write::Verification { ts_ms: now_ms, node: name.into(), result: "refused".into(), detail: serde_json::json!({"error": e.to_string()}) });
                return Outcome { writes, ..Outcome::refused(409, e.to_string(), true) };
            }
        };
        let resetting = matches!(prep, Some(PrepState::ResetOrdered | PrepState::Resetting));
        let pristine = installed.is_empty() || resetting;
        let plan = diff(&selection, if resetting { &[] } else { installed }, test, pristine);
        let (result, kind_count) = match plan.verdict {
            Verdict::Install => ("install", &mut counters.installs),
            Verdict::Match => ("match", &mut counters.matches),
            Verdict::Update => ("update", &mut counters.updates),
            Verdict::Test => ("test", &mut counters.tests),
        };
        *kind_count += 1;
        if !pristine {
            counters.verifications += 1;
        }
        let fetch_bytes: u64 = plan.fetch.iter().map(|f| f.size).sum();
        let summary = VerificationSummary { ts_ms: now_ms, result: result.into(), fetch_files: plan.fetch.len(), fetch_bytes };
        writes.push(Write::Verification {
            ts_ms: now_ms,
            node: name.into(),
            result: result.into(),
            detail: serde_json::json!({
                "reported": installed.iter().map(|i| format!("{} {}", i.name, i.version)).collect::<Vec<_>>(),
                "expected": selection.all().map(|c| format!("{} {}", c.name, c.version)).collect::<Vec<_>>(),
                "fetch": plan.fetch.iter().map(|f| f.sha256.to_string()).collect::<Vec<_>>(),
                "fetch_bytes": fetch_bytes,
                "features": features,
            }),
        });
        // Which blobs this node may now download, and whether each is image or package.
        let mut offer = BTreeMap::new();
        for c in plan.set() {
            for f in &c.files {
                if plan.fetch.iter().any(|x| x.sha256 == f.sha256) {
                    offer.insert(f.sha256.clone(), (f.size, c.kind));
                }
            }
        }
        self.offers.insert(name.to_string(), offer);
        let state = self.states.entry(name.to_string()).or_default();
        state.last_verification = Some(summary);
        state.phase = match plan.verdict {
            Verdict::Match => Phase::Running,
            Verdict::Test => Phase::Testing,
            _ => Phase::Installing,
        };
        match prep {
            Some(PrepState::ResetOrdered) => self.set_prep(name, PrepState::Resetting, &mut writes),
            Some(PrepState::RebootOrdered | PrepState::Rebooting) => {
                let s = if plan.verdict == Verdict::Match { PrepState::Validated } else { PrepState::Updated };
                self.set_prep(name, s, &mut writes);
            }
            _ => {}
        }
        Outcome { status: 200, reply: Reply::Plan(plan), writes }
    }

    fn report(&mut self, name: &str, report: NodeReport, test: bool, installed: &[Installed]) -> Outcome {
        let mut writes = Vec::new();
        let state = self.states.entry(name.to_string()).or_default();
        if !test {
            state.installed = installed.iter().map(|i| InstalledSummary { name: i.name.clone(), version: i.version.clone(), kind: i.kind }).collect();
        }
        state.phase = match (report, test) {
            (NodeReport::Stored, _) => Phase::Stored,
            (NodeReport::Running, true) => Phase::Testing,
            (NodeReport::Running, false) => Phase::Running,
        };
        if report == NodeReport::Stored {
            if let Some(PrepState::Resetting | PrepState::ResetOrdered) = self.active_campaign(name).map(|(_, s)| s) {
                self.set_prep(name, PrepState::Stored, &mut writes);
            }
        }
        Outcome { status: 200, reply: Reply::Ack, writes }
    }

    fn heartbeat(&mut self, name: &str) -> Outcome {
        let mut writes = Vec::new();
        // A node that heartbeats while `Resetting` or `Rebooting` is still running what it
        // ran: the reply that carried its order never reached it (the master that gave it
        // died between recording the order and sending it, or the reply was lost). It is
        // told again; otherwise it would run on until the campaign's deadline.
        let order = match self.active_campaign(name) {
            Some((c, prep @ (PrepState::ResetOrdered | PrepState::Resetting))) => {
                let id = c.spec.id.clone();
                if prep == PrepState::ResetOrdered {
                    self.set_prep(name, PrepState::Resetting, &mut writes);
                }
                Order::Reset { campaign: id }
            }
            Some((c, prep @ (PrepState::RebootOrdered | PrepState::Rebooting))) => {
                let id = c.spec.id.clone();
                if prep == PrepState::RebootOrdered {
                    self.set_prep(name, PrepState::Rebooting, &mut writes);
                }
                Order::Reboot { campaign: id }
            }
            _ => Order::None,
        };
        Outcome { status: 200, reply: Reply::Orders(order), writes }
    }

    /// May this signed request download this blob? Counts the bytes when it may.
    pub fn authorize_blob(&mut self, env: &Envelope, sha: &Sha256, now_ms: u64) -> Result<u64, BlobRefusal> {
        if env.body != crate::protocol::blob_body(sha) {
            return Err(BlobRefusal::Unauthenticated("the signature is not for this blob".into()));
        }
        let mut writes = Vec::new();
        let name = self.authenticate(env, now_ms, &mut writes, None).map_err(|o| match o.reply {
            Reply::Refused { reason, .. } => BlobRefusal::Unauthenticated(reason),
            _ => BlobRefusal::Unauthenticated("refused".into()),
        })?;
        let Some(&(size, kind)) = self.offers.get(&name).and_then(|o| o.get(sha)) else {
            return Err(BlobRefusal::NotOffered(sha.clone()));
        };
        let c = self.counters.entry(name).or_default();
        c.blobs_served += 1;
        match kind {
            Kind::Image => c.image_bytes += size,
            Kind::Package => c.package_bytes += size,
        }
        Ok(size)
    }

    /// Node state changed in the store by an operator (approve, forget-key).
    pub fn replace_state(&mut self, node: &str, state: NodeState) {
        self.states.insert(node.to_string(), state);
    }
}

/// What the node must fetch to run `selection`, given what it reported.
fn diff(selection: &Selection, installed: &[Installed], test: bool, pristine: bool) -> Plan {
    let ok = |c: &Chosen| installed.iter().any(|i| i.matches(c));
    let mut fetch: Vec<FileEntry> = Vec::new();
    let mut seen = BTreeSet::new();
    // Blobs the node holds, by hash, whatever package or version they came with: the
    // hashes it reports are of the files as it read them at boot, so each is content it
    // has. A new version that changes one file of many moves that file only.
    let held: BTreeSet<&Sha256> = installed.iter().flat_map(|i| i.files.iter().map(|f| &f.sha256)).collect();
    for c in selection.all() {
        if !pristine && ok(c) {
            continue;
        }
        for f in &c.files {
            if (pristine || !held.contains(&f.sha256)) && seen.insert(f.sha256.clone()) {
                fetch.push(f.clone());
            }
        }
    }
    let reported: BTreeSet<(&str, &crate::Version)> = installed.iter().map(|i| (i.name.as_str(), &i.version)).collect();
    let wanted: BTreeSet<(&str, &crate::Version)> = selection.all().map(|c| (c.name.as_str(), &c.version)).collect();
    let verdict = if test {
        Verdict::Test
    } else if pristine {
        Verdict::Install
    } else if fetch.is_empty() && reported == wanted {
        Verdict::Match
    } else {
        Verdict::Update
    };
    let image_changed = !pristine && !ok(&selection.image);
    Plan {
        verdict,
        image: selection.image.clone(),
        packages: selection.packages.clone(),
        fetch,
        store: !test,
        reboot: !test && (pristine || image_changed),
    }
}

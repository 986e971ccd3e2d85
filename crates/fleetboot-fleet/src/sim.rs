//! Master and agents wired together in memory: blobs are byte vectors, a node's local
//! disk a map, the clock an integer. The whole cycle runs deterministically, which is
//! what the protocol tests below drive.

use crate::agent::{Action, Agent, AgentConfig, BootSummary, Local};
use crate::master::{Master, Write};
use crate::model::Sha256;
use crate::protocol::{blob_body, nonce, Envelope, Identity, Installed, KeyPair, SignedReply};
use std::collections::BTreeMap;

pub struct SimNode {
    pub identity: Identity,
    pub key: KeyPair,
    pub features: Vec<String>,
    /// The local disk: stored set and blobs.
    pub stored: Vec<Installed>,
    pub disk: BTreeMap<Sha256, Vec<u8>>,
    pub master_key: Option<String>,
    /// What the last boot ran, and whether the node wants a reboot.
    pub last: BootSummary,
    pub ran_volatile: Vec<Sha256>,
    pub reboot_wanted: bool,
}

impl SimNode {
    pub fn new(identity: Identity) -> SimNode {
        SimNode {
            identity,
            key: KeyPair::generate().unwrap(),
            features: vec![],
            stored: vec![],
            disk: BTreeMap::new(),
            master_key: None,
            last: BootSummary::default(),
            ran_volatile: vec![],
            reboot_wanted: false,
        }
    }

    /// The stored set as the node reports it at boot: file hashes re-read from its disk.
    fn local(&self) -> Local {
        let stored = self
            .stored
            .iter()
            .map(|i| {
                let mut i = i.clone();
                for f in &mut i.files {
                    if let Some(b) = self.disk.get(&f.sha256) {
                        f.sha256 = Sha256::of(b);
                    }
                }
                i
            })
            .collect();
        Local { stored, master_key: self.master_key.clone() }
    }
}

pub struct Sim {
    pub master: Master,
    pub master_key: KeyPair,
    pub blobs: BTreeMap<Sha256, Vec<u8>>,
    pub now_ms: u64,
    pub writes: Vec<Write>,
    /// Before this many more downloads, another master takes over: one started afresh
    /// from what the old one made durable, which knows nothing of the plans it sent.
    pub takeover_after_fetches: Option<usize>,
}

impl Sim {
    fn exchange(&mut self, node: &SimNode, msg: &crate::protocol::AgentMessage) -> (SignedReply, String) {
        let n = nonce();
        let env = Envelope::sign(&node.key, node.identity.mac, self.now_ms, n.clone(), serde_json::to_string(msg).unwrap());
        let out = self.master.handle(&env, self.now_ms);
        // As the shell does once the writes are durable.
        self.master.confirm(&out.writes);
        self.writes.extend(out.writes);
        (SignedReply::sign(&self.master_key, &n, &out.reply), n)
    }

    /// Another master takes over, started afresh from what this one made durable: it
    /// knows nothing of the plans and replies this one sent.
    pub fn take_over(&mut self) {
        let db = self.master.db().clone();
        let states = self.master.states().clone();
        let campaigns = self.master.campaigns().values().cloned().collect();
        self.master = Master::new(self.master.policy().clone(), db, states, campaigns);
    }

    /// One boot of `node`, to its end (exit, reboot, or `heartbeats` heartbeats when it stays).
    pub fn boot(&mut self, node: &mut SimNode, stay: bool, heartbeats: usize) {
        let mut cfg = AgentConfig::new(node.identity.clone());
        cfg.features = node.features.clone();
        cfg.stay = stay;
        let (mut agent, mut actions) = Agent::boot(cfg, node.local());
        let mut volatile: BTreeMap<Sha256, Vec<u8>> = BTreeMap::new();
        let mut beats = 0;
        node.reboot_wanted = false;
        node.ran_volatile.clear();
        while let Some(a) = (!actions.is_empty()).then(|| actions.remove(0)) {
            self.now_ms += 1;
            let more = match a {
                Action::Send(m) => {
                    let (reply, n) = self.exchange(node, &m);
                    agent.on_reply(&reply, &n, self.now_ms)
                }
                Action::Fetch { file, volatile: vol } => {
                    if let Some(n) = self.takeover_after_fetches.as_mut() {
                        if *n == 0 {
                            self.takeover_after_fetches = None;
                            self.take_over();
                        } else {
                            *n -= 1;
                        }
                    }
                    let env = Envelope::sign(&node.key, node.identity.mac, self.now_ms, nonce(), blob_body(&file.sha256));
                    let got = match self.master.authorize_blob(&env, &file.sha256, self.now_ms) {
                        Ok(_) => {
                            let b = self.blobs.get(&file.sha256).cloned().unwrap_or_default();
                            let r = Ok((Sha256::of(&b), b.len() as u64));
                            if vol { volatile.insert(file.sha256.clone(), b) } else { node.disk.insert(file.sha256.clone(), b) };
                            r
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    agent.on_fetched(&file.sha256, got, self.now_ms)
                }
                Action::Store(set) => {
                    node.stored = set;
                    let keep: std::collections::BTreeSet<_> = node.stored.iter().flat_map(|i| i.files.iter().map(|f| f.sha256.clone())).collect();
                    node.disk.retain(|k, _| keep.contains(k));
                    vec![]
                }
                Action::PinMasterKey(k) => {
                    node.master_key = Some(k);
                    vec![]
                }
                Action::Run(items) => {
                    for i in &items {
                        for f in &i.files {
                            if volatile.contains_key(&f.sha256) {
                                node.ran_volatile.push(f.sha256.clone());
                            } else {
                                assert_eq!(node.disk.get(&f.sha256).map(|b| Sha256::of(b)), Some(f.sha256.clone()), "runs only intact files");
                            }
                        }
                    }
                    vec![]
                }
                Action::Wipe => {
                    node.stored.clear();
                    node.disk.clear();
                    vec![]
                }
                Action::Reboot => {
                    node.reboot_wanted = true;
                    vec![]
                }
                Action::Wait { until_ms } => {
                    if beats >= heartbeats {
                        break;
                    }
                    beats += 1;
                    self.now_ms = self.now_ms.max(until_ms);
                    agent.on_timer(self.now_ms)
                }
                Action::Exit { ok, reason } => {
                    assert!(ok, "node {} failed: {reason}", node.identity.mac);
                    vec![]
                }
            };
            actions.extend(more);
        }
        node.last = agent.summary.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::{CampaignSpec, Policy, PrepState, Stage};
    use crate::model::{Change, FileEntry, FleetDb, Kind};
    use crate::testdb::*;

    /// The sample fleet, with blob contents that hash to what the packages list.
    fn sim(nodes: &[(&str, u8)]) -> (Sim, Vec<SimNode>) {
        let mut db = sample();
        for (name, last) in nodes {
            db.apply(&Change::PutNode(node(name, *last, Some("linecards")))).unwrap();
        }
        let mut blobs = BTreeMap::new();
        for p in db.all_packages() {
            for b in &p.builds {
                let content = match p.kind {
                    Kind::Image => format!("{} {} {} kernel", p.name, p.version, b.arch),
                    Kind::Package => format!("{} {} {}", p.name, p.version, b.arch),
                };
                blobs.insert(Sha256::of(content.as_bytes()), content.into_bytes());
            }
        }
        let sim_nodes = nodes
            .iter()
            .map(|(name, _)| {
                let n = db.nodes[*name].clone();
                SimNode::new(Identity { mac: n.mac, uuid: None, node_type: n.node_type, arch: n.arch, location: None })
            })
            .collect();
        let master = Master::new(Policy::default(), db, BTreeMap::new(), vec![]);
        (Sim { master, master_key: KeyPair::generate().unwrap(), blobs, now_ms: 1_000_000, writes: vec![], takeover_after_fetches: None }, sim_nodes)
    }

    fn counters(s: &Sim, node: &str) -> crate::master::Counters {
        s.master.counters().get(node).copied().unwrap_or_default()
    }

    fn change(s: &mut Sim, c: Change) {
        let mut db: FleetDb = s.master.db().clone();
        db.apply(&c).unwrap();
        let w = s.master.reload(db, vec![], s.now_ms, u64::MAX);
        s.writes.extend(w);
    }

    #[test]
    fn pristine_stored_then_verified_with_no_download() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        let n = &mut nodes[0];
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Install));
        assert!(n.reboot_wanted, "a pristine node reboots into its stored image");
        let first = counters(&s, "lc1");
        assert!(first.image_bytes > 0 && first.package_bytes > 0);
        assert_eq!(n.stored.len(), 4, "image + base, monitor, routing");

        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
        assert_eq!(n.last.ran, ["lc-boot 1.1", "base 2.0", "monitor 0.3", "routing 2.0"]);
        let second = counters(&s, "lc1");
        assert_eq!((second.image_bytes, second.package_bytes), (first.image_bytes, first.package_bytes), "the second boot moves no bytes");
        assert_eq!((second.verifications, second.matches), (1, 1));
        assert!(s.writes.iter().any(|w| matches!(w, Write::Verification { result, .. } if result == "match")), "every verification is recorded");
    }

    #[test]
    fn a_master_that_takes_over_mid_download_gets_asked_for_a_new_plan() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        let n = &mut nodes[0];
        s.takeover_after_fetches = Some(2);
        // One wait: the agent's pause before it asks again.
        s.boot(n, false, 1);
        assert_eq!(s.takeover_after_fetches, None, "the takeover happened");
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Install));
        assert!(n.reboot_wanted);
        assert_eq!(n.stored.len(), 4, "the whole set, from the new master's plan");
        // Three refused downloads of the third blob, then the new plan fetched all again.
        assert_eq!(n.last.refetched, 3);
        assert_eq!(n.last.fetched_files, 2 + 4);
        assert_eq!(counters(&s, "lc1").boots, 1, "the new master served one plan");
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
    }

    #[test]
    fn a_new_preferred_version_moves_only_that_package_and_rollback_returns() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        let n = &mut nodes[0];
        s.boot(n, false, 0);
        s.boot(n, false, 0);
        // monitor 0.4 appears; the class prefers it.
        let m4 = pkg("monitor", "0.4", &[("base", ">=1.1")], &["snmp"], &["noarch"]);
        let m4_bytes = m4.builds[0].files[0].size;
        s.blobs.insert(m4.builds[0].files[0].sha256.clone(), b"monitor 0.4 noarch".to_vec());
        change(&mut s, Change::AddPackage(m4));
        let before = counters(&s, "lc1");
        s.boot(n, false, 0);
        let after = counters(&s, "lc1");
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Update));
        assert_eq!((after.package_bytes - before.package_bytes, after.image_bytes - before.image_bytes), (m4_bytes, 0));
        assert!(n.last.ran.contains(&"monitor 0.4".to_string()));
        assert!(!n.reboot_wanted, "same image: no reboot");
        // Rollback: the class pins monitor 0.3 again; only its bytes move back.
        change(&mut s, Change::PutClass(class("linecards", &[("routing", "latest"), ("monitor", "0.3")])));
        let before = counters(&s, "lc1");
        s.boot(n, false, 0);
        let after = counters(&s, "lc1");
        assert!(n.last.ran.contains(&"monitor 0.3".to_string()));
        assert_eq!(after.package_bytes - before.package_bytes, "monitor 0.3 noarch".len() as u64);
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
    }

    #[test]
    fn a_new_version_moves_only_the_files_that_changed() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        let n = &mut nodes[0];
        s.boot(n, false, 0);
        // routing 2.1 keeps 2.0's file and adds a new one.
        let mut r21 = pkg("routing", "2.1", &[("base", ">=2")], &["bgp"], &["x86_64"]);
        let old = s.master.db().package("routing", &v("2.0")).unwrap().builds[0].files[0].clone();
        r21.builds[0].files = vec![FileEntry { path: "bin/routing".into(), ..old }, file("etc/routing.conf", "conf 2.1")];
        s.blobs.insert(Sha256::of(b"conf 2.1"), b"conf 2.1".to_vec());
        change(&mut s, Change::AddPackage(r21));
        let before = counters(&s, "lc1");
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Update));
        assert_eq!((n.last.fetched_files, counters(&s, "lc1").package_bytes - before.package_bytes), (1, "conf 2.1".len() as u64));
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
    }

    #[test]
    fn a_corrupted_local_package_is_detected_and_refetched() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        let n = &mut nodes[0];
        s.boot(n, false, 0);
        let routing = n.stored.iter().find(|i| i.name == "routing").unwrap().files[0].sha256.clone();
        n.disk.get_mut(&routing).unwrap()[0] ^= 0x20;
        let before = counters(&s, "lc1");
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Update));
        assert_eq!(counters(&s, "lc1").package_bytes - before.package_bytes, "routing 2.0 x86_64".len() as u64);
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
    }

    #[test]
    fn test_mode_runs_once_without_touching_storage() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        let n = &mut nodes[0];
        s.boot(n, false, 0);
        s.boot(n, false, 0);
        let stored_before = (n.stored.clone(), n.disk.clone());
        let mut node_cfg = s.master.db().nodes["lc1"].clone();
        node_cfg.test = Some(crate::model::TestMode { packages: [("routing".to_string(), v("1.0"))].into() });
        change(&mut s, Change::PutNode(node_cfg.clone()));
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Test));
        assert!(n.last.ran.contains(&"routing 1.0".to_string()) && n.last.ran.contains(&"base 1.1".to_string()));
        assert_eq!(n.ran_volatile.len(), 2, "routing 1.0 and base 1.1 ran from volatile memory");
        assert_eq!((n.stored.clone(), n.disk.clone()), stored_before, "the local disk is unchanged");
        node_cfg.test = None;
        change(&mut s, Change::PutNode(node_cfg));
        s.boot(n, false, 0);
        assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
        assert!(n.last.ran.contains(&"routing 2.0".to_string()));
    }

    #[test]
    fn features_give_two_nodes_of_one_type_different_packages() {
        let (mut s, mut nodes) = sim(&[("a", 1), ("b", 2)]);
        nodes[0].features = vec!["bgp".into()];
        nodes[1].features = vec!["snmp".into()];
        for n in nodes.iter_mut() {
            s.boot(n, false, 0);
            s.boot(n, false, 0);
        }
        assert_eq!(nodes[0].last.ran, ["lc-boot 1.1", "base 2.0", "routing 2.0"]);
        assert_eq!(nodes[1].last.ran, ["lc-boot 1.1", "base 2.0", "monitor 0.3"]);
    }

    #[test]
    fn prepare_all_then_a_warm_boot_that_only_validates() {
        let (mut s, mut nodes) = sim(&[("lc1", 1), ("lc2", 2), ("lc3", 3), ("lc4", 4)]);
        for n in nodes.iter_mut().take(3) {
            s.boot(n, false, 0);
            s.boot(n, true, 0);
        }
        let spec = CampaignSpec { id: "p1".into(), class: Some("linecards".into()), started_ms: s.now_ms, deadline_ms: 60_000 };
        let db = s.master.db().clone();
        s.writes.extend(s.master.reload(db, vec![spec], s.now_ms, u64::MAX));
        // A running node gets the reset with its next heartbeat and wipes its storage...
        let (reply, n) = s.exchange(&nodes[0], &crate::protocol::AgentMessage::Heartbeat);
        let order = reply.open(&s.master_key.public_hex(), &n).unwrap();
        assert_eq!(order, crate::protocol::Reply::Orders(crate::protocol::Order::Reset { campaign: "p1".into() }));
        nodes[0].stored.clear();
        nodes[0].disk.clear();
        // ...one that boots meanwhile is served as pristine; lc4 never booted before.
        let before: Vec<_> = ["lc1", "lc2", "lc3", "lc4"].iter().map(|n| counters(&s, n)).collect();
        for (i, n) in nodes.iter_mut().enumerate() {
            s.boot(n, true, 0);
            assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Install));
            assert!(n.reboot_wanted);
            assert!(counters(&s, ["lc1", "lc2", "lc3", "lc4"][i]).package_bytes > before[i].package_bytes, "everything served again");
        }
        let c = &s.master.campaigns()["p1"];
        assert_eq!(c.tally().get("stored"), Some(&4), "{:?}", c.nodes);
        // Each reboots into what it stored and verifies, then runs.
        for n in nodes.iter_mut() {
            s.boot(n, true, 0);
            assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
        }
        s.writes.extend(s.master.tick(s.now_ms));
        assert_eq!(s.master.campaigns()["p1"].stage, Stage::WarmBoot);
        let before: Vec<_> = ["lc1", "lc2", "lc3", "lc4"].iter().map(|n| counters(&s, n)).collect();
        // Warm boot: the reboot order comes with the heartbeat; the node only validates.
        for n in nodes.iter_mut() {
            let (reply, nonce) = s.exchange(n, &crate::protocol::AgentMessage::Heartbeat);
            assert!(matches!(reply.open(&s.master_key.public_hex(), &nonce).unwrap(), crate::protocol::Reply::Orders(crate::protocol::Order::Reboot { .. })));
            s.boot(n, false, 0);
            assert_eq!(n.last.verdict, Some(crate::protocol::Verdict::Match));
        }
        s.writes.extend(s.master.tick(s.now_ms));
        let c = &s.master.campaigns()["p1"];
        assert_eq!(c.stage, Stage::Done);
        assert!(c.nodes.values().all(|p| *p == PrepState::Validated), "{:?}", c.nodes);
        for (i, name) in ["lc1", "lc2", "lc3", "lc4"].iter().enumerate() {
            let after = counters(&s, name);
            assert_eq!((after.image_bytes, after.package_bytes), (before[i].image_bytes, before[i].package_bytes), "{name}: no download in the warm boot");
        }
    }

    #[test]
    fn an_order_whose_reply_never_left_the_dead_master_is_given_again() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        s.boot(&mut nodes[0], false, 0);
        s.boot(&mut nodes[0], true, 0);
        let spec = CampaignSpec { id: "p1".into(), class: Some("linecards".into()), started_ms: s.now_ms, deadline_ms: 60_000 };
        let db = s.master.db().clone();
        s.writes.extend(s.master.reload(db, vec![spec], s.now_ms, u64::MAX));
        let heartbeat = |s: &mut Sim, n: &SimNode| {
            let (reply, nonce) = s.exchange(n, &crate::protocol::AgentMessage::Heartbeat);
            reply.open(&s.master_key.public_hex(), &nonce).unwrap()
        };
        let reset = crate::protocol::Reply::Orders(crate::protocol::Order::Reset { campaign: "p1".into() });
        let reboot = crate::protocol::Reply::Orders(crate::protocol::Order::Reboot { campaign: "p1".into() });
        // The master records the reset order, then dies before its reply leaves: the node
        // never hears it and heartbeats again, to the master that took over.
        assert_eq!(heartbeat(&mut s, &nodes[0]), reset);
        s.take_over();
        assert_eq!(s.master.campaigns()["p1"].nodes["lc1"], PrepState::Resetting);
        let writes_before = s.writes.len();
        assert_eq!(heartbeat(&mut s, &nodes[0]), reset, "told again, not left running its old set");
        assert!(!s.writes[writes_before..].iter().any(|w| matches!(w, Write::Campaign(_))), "the campaign does not change");
        nodes[0].stored.clear();
        nodes[0].disk.clear();
        s.boot(&mut nodes[0], true, 0);
        assert_eq!(nodes[0].last.verdict, Some(crate::protocol::Verdict::Install));
        s.boot(&mut nodes[0], true, 0);
        s.writes.extend(s.master.tick(s.now_ms));
        assert_eq!(s.master.campaigns()["p1"].stage, Stage::WarmBoot);
        // The same for the warm boot's reboot order.
        assert_eq!(heartbeat(&mut s, &nodes[0]), reboot);
        s.take_over();
        assert_eq!(heartbeat(&mut s, &nodes[0]), reboot);
        s.boot(&mut nodes[0], false, 0);
        s.writes.extend(s.master.tick(s.now_ms));
        let c = &s.master.campaigns()["p1"];
        assert_eq!((c.stage, c.nodes["lc1"].clone()), (Stage::Done, PrepState::Validated));
        // A validated node is left alone.
        assert_eq!(heartbeat(&mut s, &nodes[0]), crate::protocol::Reply::Orders(crate::protocol::Order::None));
    }

    #[test]
    fn idle_heartbeats_are_persisted_once_a_minute() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        s.boot(&mut nodes[0], false, 0);
        let beat = |s: &mut Sim, n: &SimNode| {
            let env = Envelope::sign(&n.key, n.identity.mac, s.now_ms, nonce(), "{\"kind\":\"heartbeat\"}".into());
            s.master.handle(&env, s.now_ms).writes.len()
        };
        s.now_ms += 1000;
        assert_eq!(beat(&mut s, &nodes[0]), 0, "a heartbeat that changes nothing writes nothing");
        s.now_ms += 61_000;
        assert_eq!(beat(&mut s, &nodes[0]), 1, "but last-seen is persisted once a minute");
        assert_eq!(s.master.states()["lc1"].last_seen_ms, s.now_ms);
    }

    #[test]
    fn a_reload_does_not_lose_what_the_master_has_not_yet_confirmed() {
        let (mut s, _) = sim(&[]);
        let stored = s.master.db().clone();
        s.master = Master::new(Policy { register_unknown: Some("linecards".into()), ..Policy::default() }, stored.clone(), BTreeMap::new(), vec![]);
        let n = SimNode::new(Identity { mac: "52:54:00:66:01:01".parse().unwrap(), uuid: None, node_type: "linecard".into(), arch: "x86_64".into(), location: None });
        let msg = crate::protocol::AgentMessage::Boot { identity: n.identity.clone(), features: vec![], installed: vec![] };
        let env = Envelope::sign(&n.key, n.identity.mac, s.now_ms, nonce(), serde_json::to_string(&msg).unwrap());
        let out = s.master.handle(&env, s.now_ms);
        let crate::protocol::Reply::Plan(plan) = out.reply else { panic!("{:?}", out.reply) };
        // Another exchange reloads from a store that has not got the registration yet.
        let before_commit = s.master.generation();
        s.master.reload(stored.clone(), vec![], s.now_ms, before_commit);
        let name = "node-52-54-00-66-01-01";
        assert!(s.master.db().nodes[name].key.is_some(), "registration and enrolment survive the reload");
        let sha = plan.fetch[0].sha256.clone();
        let env = Envelope::sign(&n.key, n.identity.mac, s.now_ms, nonce(), blob_body(&sha));
        assert!(s.master.authorize_blob(&env, &sha, s.now_ms).is_ok(), "and so does the node's offer");
        // Confirmed durable while a slow read of the store (begun before) was under way:
        // that read does not have it either, so it is still applied.
        s.master.confirm(&out.writes);
        s.master.reload(stored.clone(), vec![], s.now_ms, before_commit);
        assert!(s.master.db().nodes.contains_key(name));
        // A read begun after the confirmation has it: the store's version is the truth.
        let after_commit = s.master.generation();
        s.master.reload(stored, vec![], s.now_ms, after_commit);
        assert!(!s.master.db().nodes.contains_key(name));
    }

    #[test]
    fn a_deadline_reports_the_nodes_that_did_not_make_it() {
        let (mut s, mut nodes) = sim(&[("lc1", 1), ("lc2", 2)]);
        let spec = CampaignSpec { id: "p1".into(), class: None, started_ms: s.now_ms, deadline_ms: 10_000 };
        let db = s.master.db().clone();
        s.writes.extend(s.master.reload(db, vec![spec], s.now_ms, u64::MAX));
        s.boot(&mut nodes[0], false, 0);
        s.now_ms += 20_000;
        s.writes.extend(s.master.tick(s.now_ms));
        let c = &s.master.campaigns()["p1"];
        assert_eq!((c.nodes["lc1"].clone(), c.nodes["lc2"].clone()), (PrepState::RebootOrdered, PrepState::TimedOut));
    }

    #[test]
    fn identities_are_enforced() {
        let (mut s, mut nodes) = sim(&[("lc1", 1)]);
        s.boot(&mut nodes[0], false, 0);
        // Another key for the same MAC is refused, and so is an unknown MAC.
        let mut impostor = SimNode::new(nodes[0].identity.clone());
        let (reply, n) = s.exchange(&impostor, &crate::protocol::AgentMessage::Heartbeat);
        let r = reply.open(&s.master_key.public_hex(), &n).unwrap();
        assert!(matches!(r, crate::protocol::Reply::Refused { ref reason, .. } if reason.contains("forget-key lc1")), "{r:?}");
        impostor.identity.mac = "52:54:00:66:00:99".parse().unwrap();
        let (reply, n) = s.exchange(&impostor, &crate::protocol::AgentMessage::Heartbeat);
        assert!(matches!(reply.open(&s.master_key.public_hex(), &n).unwrap(), crate::protocol::Reply::Refused { ref reason, .. } if reason.contains("unknown node")));
        // A replayed request is refused; a blob not offered is refused.
        let env = Envelope::sign(&nodes[0].key, nodes[0].identity.mac, s.now_ms, nonce(), "{\"kind\":\"heartbeat\"}".into());
        assert_eq!(s.master.handle(&env, s.now_ms).status, 200);
        assert_eq!(s.master.handle(&env, s.now_ms).status, 401);
        let sha = s.blobs.keys().next().unwrap().clone();
        let env = Envelope::sign(&nodes[0].key, nodes[0].identity.mac, s.now_ms, nonce(), blob_body(&sha));
        assert!(s.master.authorize_blob(&env, &sha, s.now_ms).is_err());
        // With approval required, a new node waits for the operator.
        let mut db = s.master.db().clone();
        db.apply(&Change::PutNode(node("lc9", 9, Some("linecards")))).unwrap();
        let mut m = Master::new(Policy { enroll: crate::master::Enroll::Approve, ..Policy::default() }, db, BTreeMap::new(), vec![]);
        let lc9 = SimNode::new(Identity { mac: node("lc9", 9, None).mac, uuid: None, node_type: "linecard".into(), arch: "x86_64".into(), location: None });
        let hb = |m: &mut Master, now| m.handle(&Envelope::sign(&lc9.key, lc9.identity.mac, now, nonce(), "{\"kind\":\"heartbeat\"}".into()), now);
        let o = hb(&mut m, s.now_ms);
        assert!(matches!(o.reply, crate::protocol::Reply::Refused { ref reason, retry: true } if reason.contains("awaits approval")), "{o:?}");
        let pending = m.states()["lc9"].pending_key.clone().unwrap();
        assert_eq!(pending, lc9.key.public_hex());
        let mut approved = m.db().nodes["lc9"].clone();
        approved.key = Some(pending);
        let mut db = m.db().clone();
        db.apply(&Change::PutNode(approved)).unwrap();
        m.reload(db, vec![], s.now_ms, u64::MAX);
        assert_eq!(hb(&mut m, s.now_ms).status, 200);
    }
}

//! The master's databases in the store: loading them into `fleetboot_fleet` types and
//! turning changes into store writes. Shared by the master service and the CLI.

use anyhow::{Context, Result};
use fleetboot_fleet::master::{Campaign, CampaignSpec, NodeState, Write as MasterWrite};
use fleetboot_fleet::{Change, FleetDb, Package};
use fleetboot_store::fleet::FleetWrite;
use fleetboot_store::{Store, Write};
use std::collections::BTreeMap;

/// Everything the master starts from.
pub struct Loaded {
    pub db: FleetDb,
    pub config_rev: u64,
    pub specs: Vec<CampaignSpec>,
    pub campaigns: Vec<Campaign>,
}

pub fn load(store: &Store) -> Result<Loaded> {
    let rows = store.fleet_config()?;
    let mut db = FleetDb::default();
    // Packages first: nodes and classes refer to them only by name, but keep the order of
    // an import.
    for (json, _added_ms) in &rows.packages {
        let p: Package = serde_json::from_str(json).context("a stored package is unreadable")?;
        db.apply(&Change::AddPackage(p)).map_err(|e| anyhow::anyhow!("stored package: {e}"))?;
    }
    for (name, json) in &rows.classes {
        let c = serde_json::from_str(json).with_context(|| format!("stored class {name} is unreadable"))?;
        db.apply(&Change::PutClass(c)).map_err(|e| anyhow::anyhow!("stored class {name}: {e}"))?;
    }
    for (name, json) in &rows.nodes {
        let n = serde_json::from_str(json).with_context(|| format!("stored node {name} is unreadable"))?;
        db.apply(&Change::PutNode(n)).map_err(|e| anyhow::anyhow!("stored node {name}: {e}"))?;
    }
    let mut specs = Vec::new();
    let mut campaigns = Vec::new();
    for (id, spec, progress) in &rows.campaigns {
        specs.push(serde_json::from_str(spec).with_context(|| format!("stored campaign {id} is unreadable"))?);
        if let Some(p) = progress {
            campaigns.push(serde_json::from_str(p).with_context(|| format!("stored progress of campaign {id} is unreadable"))?);
        }
    }
    Ok(Loaded { db, config_rev: rows.config_rev, specs, campaigns })
}

pub fn node_states(store: &Store) -> Result<BTreeMap<String, NodeState>> {
    let mut out = BTreeMap::new();
    for (name, json) in store.fleet_node_states()? {
        match serde_json::from_str(&json) {
            Ok(s) => {
                out.insert(name, s);
            }
            Err(e) => tracing::warn!(node = %name, error = %e, "stored node state is unreadable; starting it afresh"),
        }
    }
    Ok(out)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The store write for a configuration change (operators' writes are not fenced).
pub fn config_write(c: &Change, fence: Option<u64>) -> Write {
    let write = match c {
        Change::PutNode(n) => FleetWrite::PutNode { name: n.name.clone(), mac: n.mac.to_string(), json: json(n) },
        Change::RemoveNode { name } => FleetWrite::DeleteNode { name: name.clone() },
        Change::PutClass(cl) => FleetWrite::PutClass { name: cl.name.clone(), json: json(cl) },
        Change::RemoveClass { name } => FleetWrite::DeleteClass { name: name.clone() },
        Change::AddPackage(p) => FleetWrite::PutPackage {
            name: p.name.clone(),
            version: p.version.to_string(),
            kind: p.kind.to_string(),
            json: json(p),
            added_ms: now_ms(),
        },
        Change::PrunePackage { name, version } => FleetWrite::DeletePackage { name: name.clone(), version: version.to_string() },
    };
    Write::Fleet { fence, write }
}

/// The audit entry of an operator's change made on the command line (straight to the
/// store, by whoever may open it): `db` is the state before it.
pub fn change_audit(db: &FleetDb, c: &Change, actor: &str) -> Write {
    fn j<T: serde::Serialize>(x: Option<&T>) -> Option<String> {
        x.map(json)
    }
    let (action, target, before, after) = match c {
        Change::PutNode(n) => ("fleet.node.put", format!("fleet/node/{}", n.name), j(db.nodes.get(&n.name)), j(Some(n))),
        Change::RemoveNode { name } => ("fleet.node.remove", format!("fleet/node/{name}"), j(db.nodes.get(name)), None),
        Change::PutClass(cl) => ("fleet.class.put", format!("fleet/class/{}", cl.name), j(db.classes.get(&cl.name)), j(Some(cl))),
        Change::RemoveClass { name } => ("fleet.class.remove", format!("fleet/class/{name}"), j(db.classes.get(name)), None),
        Change::AddPackage(p) => ("fleet.package.add", format!("fleet/package/{}/{}", p.name, p.version), None, j(Some(p))),
        Change::PrunePackage { name, version } => {
            ("fleet.package.prune", format!("fleet/package/{name}/{version}"), j(db.packages.get(name).and_then(|vs| vs.get(version))), None)
        }
    };
    Write::Audit(fleetboot_store::AuditEntry {
        id: 0,
        ts_ms: now_ms(),
        actor: actor.into(),
        actor_id: None,
        action: action.into(),
        target,
        before,
        after,
        remote: None,
    })
}

pub fn campaign_spec_write(spec: &CampaignSpec) -> Write {
    Write::Fleet { fence: None, write: FleetWrite::PutCampaign { id: spec.id.clone(), json: json(spec) } }
}

/// The store writes for what the master decided, fenced by its epoch.
pub fn master_writes(writes: Vec<MasterWrite>, epoch: u64) -> Vec<Write> {
    let fence = Some(epoch);
    writes
        .into_iter()
        .map(|w| match w {
            MasterWrite::NodeState { node, state } => Write::Fleet { fence, write: FleetWrite::PutNodeState { name: node, json: json(&state) } },
            MasterWrite::Verification { ts_ms, node, result, detail } => {
                Write::Fleet { fence, write: FleetWrite::Verification { ts_ms, node, result, detail: detail.to_string() } }
            }
            MasterWrite::Config(c) => config_write(&c, fence),
            MasterWrite::Campaign(c) => Write::Fleet { fence, write: FleetWrite::CampaignProgress { id: c.spec.id.clone(), json: json(&c) } },
        })
        .collect()
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

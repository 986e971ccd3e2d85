//! The provisioning master's tables (node and package databases), as plain rows.
//!
//! The master's types live in `fleetboot-fleet`; here they are JSON text beside the
//! columns that are looked up. Two kinds of writes:
//! - configuration (nodes, classes, packages, prepare campaigns) — by operators through
//!   bundles, the CLI and the API; each bumps `config_rev`, which a running master polls to
//!   reload what changed under it;
//! - master state (what each node reported, verifications) — by the active master only,
//!   fenced: a write carries the epoch its master was elected with and is refused once a
//!   newer epoch has been claimed, so a deposed master that wakes up cannot write.

use rusqlite::{params, Connection, OptionalExtension};

/// One change to the master's tables.
#[derive(Debug, Clone)]
pub enum FleetWrite {
    PutNode { name: String, mac: String, json: String },
    DeleteNode { name: String },
    PutClass { name: String, json: String },
    DeleteClass { name: String },
    PutPackage { name: String, version: String, kind: String, json: String, added_ms: u64 },
    DeletePackage { name: String, version: String },
    PutCampaign { id: String, json: String },
    /// Master state: how a prepare campaign stands.
    CampaignProgress { id: String, json: String },
    /// Master state: what the node last reported and how it stands.
    PutNodeState { name: String, json: String },
    Verification { ts_ms: u64, node: String, result: String, detail: String },
    /// Keeps the newest `keep` verification records.
    TrimVerifications { keep: u64 },
    /// Becomes master with this epoch; refused unless it is newer than the current one.
    ClaimEpoch { epoch: u64 },
}

impl FleetWrite {
    fn is_config(&self) -> bool {
        matches!(
            self,
            FleetWrite::PutNode { .. }
                | FleetWrite::DeleteNode { .. }
                | FleetWrite::PutClass { .. }
                | FleetWrite::DeleteClass { .. }
                | FleetWrite::PutPackage { .. }
                | FleetWrite::DeletePackage { .. }
                | FleetWrite::PutCampaign { .. }
        )
    }
}

/// A write that fails its fence check: another master has claimed a newer epoch.
#[derive(Debug)]
pub struct StaleEpoch {
    pub held: u64,
    pub current: u64,
}

impl std::fmt::Display for StaleEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stale master epoch {} (the current epoch is {}): this master was deposed", self.held, self.current)
    }
}

impl std::error::Error for StaleEpoch {}

fn stale(held: u64, current: u64) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(StaleEpoch { held, current }))
}

pub(crate) fn apply(tx: &Connection, fence: Option<u64>, w: &FleetWrite) -> rusqlite::Result<()> {
    let (epoch, _) = meta(tx)?;
    if let Some(held) = fence {
        if held != epoch {
            return Err(stale(held, epoch));
        }
    }
    if w.is_config() {
        tx.execute("UPDATE fleet_meta SET config_rev = config_rev + 1 WHERE id = 1", [])?;
    }
    let rev: i64 = tx.query_row("SELECT config_rev FROM fleet_meta WHERE id = 1", [], |r| r.get(0))?;
    match w {
        FleetWrite::PutNode { name, mac, json } => {
            tx.prepare_cached(
                "INSERT INTO fleet_nodes (name, mac, json, rev) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET mac = ?2, json = ?3, rev = ?4",
            )?
            .execute(params![name, mac, json, rev])?;
        }
        FleetWrite::DeleteNode { name } => {
            tx.prepare_cached("DELETE FROM fleet_nodes WHERE name = ?1")?.execute(params![name])?;
            tx.prepare_cached("DELETE FROM fleet_node_state WHERE name = ?1")?.execute(params![name])?;
        }
        FleetWrite::PutClass { name, json } => {
            tx.prepare_cached(
                "INSERT INTO fleet_classes (name, json, rev) VALUES (?1, ?2, ?3) ON CONFLICT(name) DO UPDATE SET json = ?2, rev = ?3",
            )?
            .execute(params![name, json, rev])?;
        }
        FleetWrite::DeleteClass { name } => {
            tx.prepare_cached("DELETE FROM fleet_classes WHERE name = ?1")?.execute(params![name])?;
        }
        FleetWrite::PutPackage { name, version, kind, json, added_ms } => {
            // Versions are immutable: an identical row is a no-op, a different one an error
            // (the caller checked; the primary key is the last line of defence).
            tx.prepare_cached(
                "INSERT INTO fleet_packages (name, version, kind, json, added_ms, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name, version) DO NOTHING",
            )?
            .execute(params![name, version, kind, json, *added_ms as i64, rev])?;
        }
        FleetWrite::DeletePackage { name, version } => {
            tx.prepare_cached("DELETE FROM fleet_packages WHERE name = ?1 AND version = ?2")?.execute(params![name, version])?;
        }
        FleetWrite::PutCampaign { id, json } => {
            tx.prepare_cached(
                "INSERT INTO fleet_campaigns (id, json, rev) VALUES (?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET json = ?2, rev = ?3",
            )?
            .execute(params![id, json, rev])?;
        }
        FleetWrite::CampaignProgress { id, json } => {
            tx.prepare_cached("UPDATE fleet_campaigns SET progress = ?2 WHERE id = ?1")?.execute(params![id, json])?;
        }
        FleetWrite::PutNodeState { name, json } => {
            tx.prepare_cached(
                "INSERT INTO fleet_node_state (name, json, epoch) VALUES (?1, ?2, ?3) ON CONFLICT(name) DO UPDATE SET json = ?2, epoch = ?3",
            )?
            .execute(params![name, json, epoch as i64])?;
        }
        FleetWrite::Verification { ts_ms, node, result, detail } => {
            tx.prepare_cached("INSERT INTO fleet_verifications (ts_ms, node, result, detail, epoch) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![*ts_ms as i64, node, result, detail, epoch as i64])?;
        }
        FleetWrite::TrimVerifications { keep } => {
            tx.prepare_cached("DELETE FROM fleet_verifications WHERE id <= (SELECT MAX(id) FROM fleet_verifications) - ?1")?
                .execute(params![*keep as i64])?;
        }
        FleetWrite::ClaimEpoch { epoch: wanted } => {
            if *wanted <= epoch {
                return Err(stale(*wanted, epoch));
            }
            tx.execute("UPDATE fleet_meta SET epoch = ?1 WHERE id = 1", params![*wanted as i64])?;
        }
    }
    Ok(())
}

fn meta(c: &Connection) -> rusqlite::Result<(u64, u64)> {
    c.query_row("SELECT epoch, config_rev FROM fleet_meta WHERE id = 1", [], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
    })
}

/// The master epoch and configuration revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetMeta {
    pub epoch: u64,
    pub config_rev: u64,
}

/// The configuration tables, as stored.
#[derive(Debug, Clone, Default)]
pub struct FleetConfigRows {
    pub config_rev: u64,
    /// (name, json)
    pub nodes: Vec<(String, String)>,
    pub classes: Vec<(String, String)>,
    /// json of every package version, with when it was added (unix ms).
    pub packages: Vec<(String, u64)>,
    /// (id, spec json, progress json once the master has started it)
    pub campaigns: Vec<(String, String, Option<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationRecord {
    pub ts_ms: u64,
    pub node: String,
    pub result: String,
    pub detail: String,
    pub epoch: u64,
}

pub(crate) fn read_meta(c: &Connection) -> rusqlite::Result<FleetMeta> {
    meta(c).map(|(epoch, config_rev)| FleetMeta { epoch, config_rev })
}

pub(crate) fn read_config(c: &Connection) -> rusqlite::Result<FleetConfigRows> {
    // One read transaction: the rows and the revision they belong to agree.
    c.execute_batch("BEGIN")?;
    let out = (|| {
        let pairs = |sql: &str| -> rusqlite::Result<Vec<(String, String)>> {
            let mut st = c.prepare(sql)?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        };
        let mut st = c.prepare("SELECT json, added_ms FROM fleet_packages ORDER BY name, version")?;
        let packages = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?.collect::<rusqlite::Result<_>>()?;
        Ok(FleetConfigRows {
            config_rev: meta(c)?.1,
            nodes: pairs("SELECT name, json FROM fleet_nodes ORDER BY name")?,
            classes: pairs("SELECT name, json FROM fleet_classes ORDER BY name")?,
            packages,
            campaigns: {
                let mut st = c.prepare("SELECT id, json, progress FROM fleet_campaigns ORDER BY id")?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            },
        })
    })();
    c.execute_batch("COMMIT")?;
    out
}

pub(crate) fn read_node_states(c: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = c.prepare("SELECT name, json FROM fleet_node_state ORDER BY name")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

pub(crate) fn read_node_state(c: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    c.query_row("SELECT json FROM fleet_node_state WHERE name = ?1", params![name], |r| r.get(0)).optional()
}

pub(crate) fn read_verifications(c: &Connection, node: Option<&str>, limit: usize) -> rusqlite::Result<Vec<VerificationRecord>> {
    let mut st = c.prepare(
        "SELECT ts_ms, node, result, detail, epoch FROM (SELECT * FROM fleet_verifications
         WHERE ?1 IS NULL OR node = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
    )?;
    let rows = st.query_map(params![node, limit as i64], |r| {
        Ok(VerificationRecord {
            ts_ms: r.get::<_, i64>(0)? as u64,
            node: r.get(1)?,
            result: r.get(2)?,
            detail: r.get(3)?,
            epoch: r.get::<_, i64>(4)? as u64,
        })
    })?;
    rows.collect()
}

//! Several servers on one store: the master lease and the replicas' reports, on both
//! backends (a SQLite store is one host's, but two `fleetboot master` processes on it
//! still need exactly one active master).
//!
//! **The master lease** is one row: who holds it (a process: server name + instance), the
//! URL agents and backups reach it at, and until when (Unix ms on the database's clock).
//! [`MasterClaim`] renews it (the holder) or takes it (anyone, once it has expired);
//! taking it claims the next epoch in the same transaction, so every write of the
//! previous master — fenced by its epoch — is refused from that commit on. A backup never
//! takes a lease that is still valid: the operator's designated order decides *when* each
//! backup may try (see `fleetboot::fleet::replica`), the row decides *who* wins.
//!
//! **Replica reports**: each master and backup says, every heartbeat, how far it is —
//! the configuration revision it has loaded, the blobs it should hold and how many it
//! lacks — which is what `fleetboot master status` shows as replication lag.

use serde::Serialize;

/// One attempt to hold the master lease.
#[derive(Debug, Clone)]
pub struct MasterClaim<'a> {
    pub name: &'a str,
    /// Unique per process: a restarted master is a new holder.
    pub instance: &'a str,
    /// Where agents and backups reach this master.
    pub url: &'a str,
    pub ttl_ms: u64,
    /// Take the lease if it is free or expired (else only renew it if held).
    pub may_take: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterHolder {
    pub name: String,
    pub instance: String,
    pub url: String,
    pub expires_ms: u64,
    pub since_ms: u64,
}

/// The lease after an attempt (or a read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasterLease {
    pub holder: Option<MasterHolder>,
    /// The current master epoch.
    pub epoch: u64,
    /// The database's clock when it was read.
    pub now_ms: u64,
    /// The claimant holds the lease now.
    pub mine: bool,
    /// The claimant took it in this attempt (and `epoch` is its new epoch).
    pub taken: bool,
}

impl MasterLease {
    /// Whether someone holds a lease that has not expired.
    pub fn is_held(&self) -> bool {
        self.holder.as_ref().is_some_and(|h| h.expires_ms > self.now_ms)
    }
}

/// What a master or backup reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaReport {
    pub name: String,
    pub instance: String,
    pub url: String,
    /// `master` or `backup`.
    pub role: String,
    /// The configuration revision its databases are loaded at.
    pub loaded_rev: u64,
    /// Blobs the package database names, how many of them it lacks, and their bytes.
    pub blobs_wanted: u64,
    pub blobs_missing: u64,
    pub bytes_missing: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaRow {
    #[serde(flatten)]
    pub report: ReplicaReport,
    pub seen_ms: u64,
}

/// Everything `fleetboot master status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    pub lease: MasterLease,
    pub config_rev: u64,
    pub replicas: Vec<ReplicaRow>,
}

// ---- SQLite ---------------------------------------------------------------------------

pub(crate) mod sqlite {
    use super::*;
    use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

    pub(crate) fn now_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }

    fn holder(c: &Connection) -> rusqlite::Result<Option<MasterHolder>> {
        c.query_row("SELECT holder, name, url, expires_ms, since_ms FROM fleet_master WHERE id = 1", [], |r| {
            Ok(r.get::<_, Option<String>>(0)?.map(|instance| MasterHolder {
                instance,
                name: r.get::<_, Option<String>>(1).ok().flatten().unwrap_or_default(),
                url: r.get::<_, Option<String>>(2).ok().flatten().unwrap_or_default(),
                expires_ms: r.get::<_, i64>(3).unwrap_or(0) as u64,
                since_ms: r.get::<_, i64>(4).unwrap_or(0) as u64,
            }))
        })
        .optional()
        .map(Option::flatten)
    }

    fn epoch(c: &Connection) -> rusqlite::Result<u64> {
        c.query_row("SELECT epoch FROM fleet_meta WHERE id = 1", [], |r| r.get::<_, i64>(0)).map(|e| e as u64)
    }

    pub(crate) fn claim(conn: &mut Connection, claim: &MasterClaim<'_>) -> rusqlite::Result<MasterLease> {
        // IMMEDIATE: the write lock first, as the writer thread takes it — the claim and
        // every fenced write are serialized.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let current = holder(&tx)?;
        let mut epoch = epoch(&tx)?;
        let expires = now + claim.ttl_ms;
        let (mine, taken) = match &current {
            Some(h) if h.instance == claim.instance => {
                tx.execute("UPDATE fleet_master SET expires_ms = ?1, url = ?2 WHERE id = 1", params![expires as i64, claim.url])?;
                (true, false)
            }
            h if claim.may_take && h.as_ref().is_none_or(|h| h.expires_ms <= now) => {
                epoch += 1;
                tx.execute("UPDATE fleet_meta SET epoch = ?1 WHERE id = 1", params![epoch as i64])?;
                tx.execute(
                    "UPDATE fleet_master SET holder = ?1, name = ?2, url = ?3, expires_ms = ?4, since_ms = ?5 WHERE id = 1",
                    params![claim.instance, claim.name, claim.url, expires as i64, now as i64],
                )?;
                (true, true)
            }
            _ => (false, false),
        };
        let holder = holder(&tx)?;
        tx.commit()?;
        Ok(MasterLease { holder, epoch, now_ms: now, mine, taken })
    }

    pub(crate) fn release(conn: &mut Connection, instance: &str) -> rusqlite::Result<()> {
        conn.execute("UPDATE fleet_master SET expires_ms = 0 WHERE id = 1 AND holder = ?1", params![instance])?;
        Ok(())
    }

    pub(crate) fn report(conn: &mut Connection, r: &ReplicaReport) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO fleet_replicas (name, instance, url, role, seen_ms, loaded_rev, blobs_wanted, blobs_missing, bytes_missing)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (name) DO UPDATE SET instance = ?2, url = ?3, role = ?4, seen_ms = ?5, loaded_rev = ?6,
                 blobs_wanted = ?7, blobs_missing = ?8, bytes_missing = ?9",
            params![
                r.name,
                r.instance,
                r.url,
                r.role,
                now_ms() as i64,
                r.loaded_rev as i64,
                r.blobs_wanted as i64,
                r.blobs_missing as i64,
                r.bytes_missing as i64
            ],
        )?;
        Ok(())
    }

    pub(crate) fn status(conn: &mut Connection) -> rusqlite::Result<ClusterStatus> {
        let tx = conn.transaction()?;
        let now = now_ms();
        let holder = holder(&tx)?;
        let epoch = epoch(&tx)?;
        let config_rev: i64 = tx.query_row("SELECT config_rev FROM fleet_meta WHERE id = 1", [], |r| r.get(0))?;
        let replicas = {
            let mut st = tx.prepare(
                "SELECT name, instance, url, role, seen_ms, loaded_rev, blobs_wanted, blobs_missing, bytes_missing
                 FROM fleet_replicas ORDER BY name",
            )?;
            let rows = st.query_map([], |r| {
                Ok(ReplicaRow {
                    report: ReplicaReport {
                        name: r.get(0)?,
                        instance: r.get(1)?,
                        url: r.get(2)?,
                        role: r.get(3)?,
                        loaded_rev: r.get::<_, i64>(5)? as u64,
                        blobs_wanted: r.get::<_, i64>(6)? as u64,
                        blobs_missing: r.get::<_, i64>(7)? as u64,
                        bytes_missing: r.get::<_, i64>(8)? as u64,
                    },
                    seen_ms: r.get::<_, i64>(4)? as u64,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(ClusterStatus { lease: MasterLease { holder, epoch, now_ms: now, mine: false, taken: false }, config_rev: config_rev as u64, replicas })
    }
}

//! Leases of several DHCP servers sharing one PostgreSQL: the database decides.
//!
//! A server's lease changes go to one task that commits whatever is pending in one
//! transaction (group commit, as everywhere in the store) with set-based statements — a
//! batch costs the same few round trips whatever its size:
//!
//! 1. `INSERT ... ON CONFLICT (ip) DO UPDATE ... WHERE` the row is free (expired) or
//!    already this client's — `RETURNING ip` says which binds won. Two servers binding
//!    one address for two clients: one row, one winner; the loser's server sends no ACK
//!    and learns who holds the address ([`StoreError::LeaseConflict`]).
//! 2. The removals of the jobs that won (`DELETE ... WHERE ip AND mac`: a server never
//!    removes a lease another client has meanwhile).
//! 3. `pg_notify` of what changed, so the other servers' lease tables follow at commit.
//! 4. `COMMIT`: only then does a job resolve `Ok`, and only then does its ACK leave.
//!
//! DHCP membership (who is alive) is a row per server with a heartbeat on the database's
//! clock: [`heartbeat`] returns the servers heard from within the peer timeout.

use super::{notice_payload, pg_error, NoticeKind, PgStore, CHANNEL, NOW_MS};
use crate::{LeaseRecord, Result, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Lease jobs waiting for the writer at most; past it a commit fails at once (the DHCP
/// shell sends no reply and the client retries) rather than queueing without bound.
pub(crate) const MAX_PENDING: usize = 65_536;

/// Jobs committed in one transaction at most.
const MAX_BATCH: usize = 2048;

/// A commit taking longer than this is abandoned (and its connection with it): the
/// replies that wait on it are withheld rather than held forever.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// One DHCP exchange's lease changes, committed together or not at all.
#[derive(Debug, Clone, Default)]
pub struct LeaseCommit {
    /// Bound or declined leases: each succeeds only if its address is free or already
    /// this client's.
    pub binds: Vec<LeaseRecord>,
    /// (address, MAC): removed only while that client still holds it.
    pub removes: Vec<(Ipv4Addr, String)>,
    /// Unix seconds on the committing server's clock: rows expired by then are free.
    pub now: u64,
}

pub(crate) struct LeaseJob {
    pub commit: LeaseCommit,
    pub done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// A lease change as announced to the other servers (compact JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseNotice {
    /// `b`: bound or declined (the row as it now is); `r`: removed.
    pub op: char,
    pub ip: Ipv4Addr,
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    #[serde(default)]
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default)]
    pub state: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl LeaseNotice {
    pub fn bound(l: &LeaseRecord) -> LeaseNotice {
        LeaseNotice {
            op: 'b',
            ip: l.ip,
            mac: l.mac.clone(),
            cid: l.client_id.as_deref().map(hex),
            exp: l.expires_at,
            host: l.hostname.clone(),
            state: l.state.clone(),
        }
    }

    pub fn removed(ip: Ipv4Addr, mac: String) -> LeaseNotice {
        LeaseNotice { op: 'r', ip, mac, cid: None, exp: 0, host: None, state: String::new() }
    }

    /// The row a `b` notice stands for.
    pub fn record(&self) -> LeaseRecord {
        LeaseRecord {
            ip: self.ip,
            mac: self.mac.clone(),
            client_id: self.cid.as_deref().and_then(unhex),
            expires_at: self.exp,
            hostname: self.host.clone(),
            state: self.state.clone(),
        }
    }

    pub fn is_removal(&self) -> bool {
        self.op == 'r'
    }
}

/// Notices (or any items) as JSON arrays, each under PostgreSQL's 8000-byte payload limit
/// as long as one item is (callers keep items far below it).
pub(crate) fn chunk_notices<T: serde::Serialize>(notices: &[T]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::from("[");
    for n in notices {
        let one = serde_json::to_string(n).unwrap_or_default();
        if cur.len() + one.len() + 2 > 7000 && cur.len() > 1 {
            cur.push(']');
            out.push(std::mem::replace(&mut cur, String::from("[")));
        }
        if cur.len() > 1 {
            cur.push(',');
        }
        cur.push_str(&one);
    }
    if cur.len() > 1 {
        cur.push(']');
        out.push(cur);
    }
    out
}

/// The notices in a `leases` notice body.
pub fn parse_notices(body: &str) -> Vec<LeaseNotice> {
    serde_json::from_str(body).unwrap_or_default()
}

pub(crate) async fn run_writer(pool: deadpool_postgres::Pool, origin: String, mut rx: tokio::sync::mpsc::Receiver<LeaseJob>) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let jobs: Vec<LeaseJob> = std::mem::take(&mut batch);
        let commits: Vec<&LeaseCommit> = jobs.iter().map(|j| &j.commit).collect();
        let outcome = match tokio::time::timeout(COMMIT_TIMEOUT, commit_batch(&pool, &origin, &commits)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!("lease commit took over {} s; abandoned", COMMIT_TIMEOUT.as_secs()))),
        };
        match outcome {
            Ok(per_job) => {
                for (job, r) in jobs.into_iter().zip(per_job) {
                    let _ = job.done.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = jobs.len(), "lease commit failed; no ACK for any of them");
                for job in jobs {
                    let _ = job.done.send(Err(e.clone_for_waiter()));
                }
            }
        }
    }
}

/// Same client: the client identifier decides when both rows have one, else the MAC
/// (RFC 2131 §4.2, as the DHCP engine's lease table).
const SAME_CLIENT: &str = "(CASE WHEN leases.client_id IS NOT NULL AND excluded.client_id IS NOT NULL
                                THEN leases.client_id = excluded.client_id
                                ELSE leases.mac = excluded.mac END)";

async fn commit_batch(pool: &deadpool_postgres::Pool, origin: &str, jobs: &[&LeaseCommit]) -> Result<Vec<Result<()>>> {
    // A commit abandoned by the timeout drops this transaction, which rolls it back
    // before the connection serves anyone else.
    let mut client = PgStore::client(pool).await?;
    let tx = client.transaction().await.map_err(pg_error)?;

    // 1. One row per address in the statement: a second bind of an address within the
    // batch rides on the first (same client) or loses (another client).
    let mut first_bind: HashMap<Ipv4Addr, (usize, &LeaseRecord)> = HashMap::new();
    let mut rows: Vec<&LeaseRecord> = Vec::new();
    for (j, c) in jobs.iter().enumerate() {
        for b in &c.binds {
            if let std::collections::hash_map::Entry::Vacant(v) = first_bind.entry(b.ip) {
                v.insert((j, b));
                rows.push(b);
            }
        }
    }
    let now = jobs.iter().map(|c| c.now).max().unwrap_or(0) as i64;
    let won: std::collections::HashSet<Ipv4Addr> = if rows.is_empty() {
        Default::default()
    } else {
        let ip: Vec<String> = rows.iter().map(|l| l.ip.to_string()).collect();
        let mac: Vec<&str> = rows.iter().map(|l| l.mac.as_str()).collect();
        let cid: Vec<Option<&[u8]>> = rows.iter().map(|l| l.client_id.as_deref()).collect();
        let exp: Vec<i64> = rows.iter().map(|l| l.expires_at as i64).collect();
        let host: Vec<Option<&str>> = rows.iter().map(|l| l.hostname.as_deref()).collect();
        let state: Vec<&str> = rows.iter().map(|l| l.state.as_str()).collect();
        let sql = format!(
            "INSERT INTO leases (ip, mac, client_id, expires_at, hostname, state)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::text[], $6::text[])
             ON CONFLICT (ip) DO UPDATE SET mac = excluded.mac, client_id = excluded.client_id,
                 expires_at = excluded.expires_at, hostname = excluded.hostname, state = excluded.state
             WHERE leases.expires_at <= $7 OR (leases.state = 'bound' AND {SAME_CLIENT})
             RETURNING ip"
        );
        let st = tx.prepare_cached(&sql).await.map_err(pg_error)?;
        tx.query(&st, &[&ip, &mac, &cid, &exp, &host, &state, &now])
            .await
            .map_err(pg_error)?
            .iter()
            .filter_map(|r| r.get::<_, String>(0).parse().ok())
            .collect()
    };
    // Which jobs won every bind they asked for.
    let mut per_job: Vec<Result<()>> = Vec::with_capacity(jobs.len());
    let mut lost: Vec<Ipv4Addr> = Vec::new();
    for (j, c) in jobs.iter().enumerate() {
        let failed = c.binds.iter().find(|b| {
            let (owner, first) = first_bind[&b.ip];
            let same = owner == j || (first.mac == b.mac && first.client_id == b.client_id);
            !(won.contains(&b.ip) && same)
        });
        match failed {
            Some(b) => {
                lost.push(b.ip);
                per_job.push(Err(StoreError::LeaseConflict { ip: b.ip, current: None }));
            }
            None => per_job.push(Ok(())),
        }
    }
    // 2. Removals of the jobs that won.
    let removes: Vec<(&Ipv4Addr, &String)> = jobs
        .iter()
        .zip(&per_job)
        .filter(|(_, r)| r.is_ok())
        .flat_map(|(c, _)| c.removes.iter().map(|(ip, mac)| (ip, mac)))
        .collect();
    let mut announce: Vec<LeaseNotice> = Vec::new();
    if !removes.is_empty() {
        let ip: Vec<String> = removes.iter().map(|(ip, _)| ip.to_string()).collect();
        let mac: Vec<&str> = removes.iter().map(|(_, m)| m.as_str()).collect();
        let st = tx
            .prepare_cached(
                "DELETE FROM leases USING unnest($1::text[], $2::text[]) AS gone(ip, mac)
                 WHERE leases.ip = gone.ip AND leases.mac = gone.mac RETURNING leases.ip, leases.mac",
            )
            .await
            .map_err(pg_error)?;
        for r in tx.query(&st, &[&ip, &mac]).await.map_err(pg_error)? {
            if let Ok(ip) = r.get::<_, String>(0).parse() {
                announce.push(LeaseNotice::removed(ip, r.get(1)));
            }
        }
    }
    for (c, r) in jobs.iter().zip(&per_job) {
        if r.is_ok() {
            announce.extend(c.binds.iter().map(LeaseNotice::bound));
        }
    }
    // Who holds the addresses that were lost, for the losers' lease tables.
    if !lost.is_empty() {
        let ips: Vec<String> = lost.iter().map(|ip| ip.to_string()).collect();
        let st = tx
            .prepare_cached("SELECT ip, mac, client_id, expires_at, hostname, state FROM leases WHERE ip = ANY($1)")
            .await
            .map_err(pg_error)?;
        let holders: HashMap<Ipv4Addr, LeaseRecord> =
            tx.query(&st, &[&ips]).await.map_err(pg_error)?.iter().filter_map(super::lease_row).map(|l| (l.ip, l)).collect();
        for r in per_job.iter_mut() {
            if let Err(StoreError::LeaseConflict { ip, current }) = r {
                *current = holders.get(ip).cloned();
            }
        }
    }
    // 3. Tell the others (delivered at commit).
    for body in chunk_notices(&announce) {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice_payload(origin, NoticeKind::Leases, &body)])
            .await
            .map_err(pg_error)?;
    }
    // 4. Durable, then the ACKs may leave.
    tx.commit().await.map_err(pg_error)?;
    Ok(per_job)
}

/// Says this server is alive and returns the live servers (heard from within
/// `peer_timeout`), sorted, this one included.
pub(crate) async fn heartbeat(pool: &deadpool_postgres::Pool, name: &str, peer_timeout: Duration) -> Result<Vec<String>> {
    let c = PgStore::client(pool).await?;
    let sql = format!(
        "WITH beat AS (INSERT INTO dhcp_servers (name, seen_ms, started_ms) VALUES ($1, {NOW_MS}, {NOW_MS})
                       ON CONFLICT (name) DO UPDATE SET seen_ms = excluded.seen_ms RETURNING name)
         SELECT name FROM dhcp_servers WHERE seen_ms > {NOW_MS} - $2 AND name <> $1
         UNION SELECT name FROM beat ORDER BY 1"
    );
    let rows = c.query(&sql, &[&name, &(peer_timeout.as_millis() as i64)]).await.map_err(pg_error)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A server announces that it joined (`joined`) or is leaving (its row removed).
pub(crate) async fn announce_membership(pool: &deadpool_postgres::Pool, origin: &str, name: &str, joined: bool) -> Result<()> {
    let mut c = PgStore::client(pool).await?;
    let tx = c.transaction().await.map_err(pg_error)?;
    if !joined {
        tx.execute("DELETE FROM dhcp_servers WHERE name = $1", &[&name]).await.map_err(pg_error)?;
    }
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice_payload(origin, NoticeKind::Servers, name)]).await.map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_chunked_under_the_payload_limit_and_read_back() {
        let l = |i: u32| LeaseRecord {
            ip: Ipv4Addr::from(0x0a00_0000 + i),
            mac: format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256),
            client_id: Some(vec![1, (i % 256) as u8]),
            expires_at: 1000 + i as u64,
            hostname: Some("n".into()),
            state: "bound".into(),
        };
        let notices: Vec<LeaseNotice> = (0..500).map(|i| LeaseNotice::bound(&l(i))).collect();
        let chunks = chunk_notices(&notices);
        assert!(chunks.len() > 1 && chunks.iter().all(|c| c.len() < 8000));
        let back: Vec<LeaseNotice> = chunks.iter().flat_map(|c| parse_notices(c)).collect();
        assert_eq!(back, notices);
        assert_eq!(back[7].record(), l(7));
        assert!(chunk_notices::<LeaseNotice>(&[]).is_empty());
    }
}

//! The writer thread of a PostgreSQL store: SQLite's group commit, on PostgreSQL.
//!
//! Every [`Write`] here has the same meaning as in `writer.rs` (SQLite); a new variant
//! needs its statement in both (this match has no wildcard, so the compiler asks).

use super::leases::{chunk_notices, LeaseNotice};
use super::{notice_payload, pg_error, NoticeKind, PgStore, CHANNEL};
use crate::fleet::FleetWrite;
use crate::writer::{Job, Write};
use crate::{Result, StoreError};
use deadpool_postgres::Transaction;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Jobs drained into one transaction at most (as SQLite's writer).
const MAX_BATCH: usize = 4096;

/// The longest profile name a notice carries (PostgreSQL's payload limit is 8000 bytes).
const MAX_NAMED: usize = 1024;

/// After a batch failed for want of a connection, jobs arriving within this time fail at
/// once instead of each waiting for a connection that is not coming.
const BACK_OFF: Duration = Duration::from_millis(500);

pub(super) fn run(store: Arc<PgStore>, rx: mpsc::Receiver<Job>) {
    let mut down_until: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let jobs: Vec<Vec<Write>> = batch.iter_mut().map(|j| std::mem::take(&mut j.writes)).collect();
        let backing_off = down_until.is_some_and(|t| Instant::now() < t);
        let outcome = if backing_off {
            Err(StoreError::Unavailable("PostgreSQL is unreachable (retrying shortly)".into()))
        } else {
            let (pool, origin) = (store.pool().clone(), store.instance().to_string());
            store.block(async move { apply(&pool, &origin, &jobs).await }).and_then(|r| r)
        };
        match &outcome {
            Err(e) => {
                // Only a real attempt moves the back-off: were the refusals inside it to
                // extend it, a store written more often than BACK_OFF would never retry.
                if !backing_off && matches!(e, StoreError::Unavailable(_)) {
                    down_until = Some(Instant::now() + BACK_OFF);
                }
                tracing::error!(error = %e, jobs = batch.len(), "store commit failed");
            }
            Ok(per_job) => {
                down_until = None;
                for e in per_job.iter().filter_map(|r| r.as_ref().err()) {
                    tracing::warn!(error = %e, "store write refused; the other writes of its batch were committed");
                }
            }
        }
        for (i, job) in batch.into_iter().enumerate() {
            if let Some(done) = job.done {
                let _ = done.send(match &outcome {
                    Ok(per_job) => per_job[i].as_ref().map(|_| ()).map_err(StoreError::clone_for_waiter),
                    Err(e) => Err(e.clone_for_waiter()),
                });
            }
        }
    }
}

/// What a batch must announce once committed.
#[derive(Default)]
struct Announce {
    leases: Vec<LeaseNotice>,
    /// The names of the profiles written or deleted.
    profiles: std::collections::BTreeSet<String>,
    fleet: bool,
}

/// One transaction for the batch: the trace events of trace-only jobs in one statement,
/// then each other job in its own savepoint, so one refused job (a fenced write from a
/// deposed master, a constraint) leaves the others committed. Outer error: nothing was.
async fn apply(pool: &deadpool_postgres::Pool, origin: &str, jobs: &[Vec<Write>]) -> Result<Vec<Result<()>>> {
    let mut client = PgStore::client(pool).await?;
    let mut tx = client.transaction().await.map_err(pg_error)?;
    let trace_only = |j: &Vec<Write>| !j.is_empty() && j.iter().all(|w| matches!(w, Write::Trace(_)));
    let traces: Vec<&crate::TraceEvent> = jobs
        .iter()
        .filter(|j| trace_only(j))
        .flat_map(|j| j.iter().filter_map(|w| if let Write::Trace(t) = w { Some(t) } else { None }))
        .collect();
    if !traces.is_empty() {
        let ts: Vec<i64> = traces.iter().map(|t| t.ts_ms as i64).collect();
        let mac: Vec<&str> = traces.iter().map(|t| t.mac.as_str()).collect();
        let kind: Vec<&str> = traces.iter().map(|t| t.kind.as_str()).collect();
        let detail: Vec<&str> = traces.iter().map(|t| t.detail.as_str()).collect();
        let st = tx
            .prepare_cached(
                "INSERT INTO trace (ts_ms, mac, kind, detail)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])",
            )
            .await
            .map_err(pg_error)?;
        tx.execute(&st, &[&ts, &mac, &kind, &detail]).await.map_err(pg_error)?;
    }
    let mut results: Vec<Result<()>> = Vec::with_capacity(jobs.len());
    let mut announce = Announce::default();
    for (i, job) in jobs.iter().enumerate() {
        if trace_only(job) || job.is_empty() {
            results.push(Ok(()));
            continue;
        }
        let sp = tx.savepoint(format!("job{i}")).await.map_err(pg_error)?;
        let mut mine = Announce::default();
        match apply_job(&sp, job, &mut mine).await {
            Ok(()) => {
                sp.commit().await.map_err(pg_error)?;
                announce.leases.extend(mine.leases);
                announce.profiles.extend(mine.profiles);
                announce.fleet |= mine.fleet;
                results.push(Ok(()));
            }
            Err(e) => {
                sp.rollback().await.map_err(pg_error)?;
                results.push(Err(e));
            }
        }
    }
    let mut payloads = Vec::new();
    for body in chunk_notices(&announce.leases) {
        payloads.push(notice_payload(origin, NoticeKind::Leases, &body));
    }
    // Each notice names the profiles it is about (the listeners read just those); a name
    // too long to fit a notice makes it an unnamed one: read them all.
    let names: Vec<&String> = announce.profiles.iter().collect();
    if names.iter().any(|n| n.len() > MAX_NAMED) {
        payloads.push(notice_payload(origin, NoticeKind::Profiles, ""));
    } else {
        for body in chunk_notices(&names) {
            payloads.push(notice_payload(origin, NoticeKind::Profiles, &body));
        }
    }
    if announce.fleet {
        payloads.push(notice_payload(origin, NoticeKind::Fleet, ""));
    }
    for p in payloads {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &p]).await.map_err(pg_error)?;
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(results)
}

async fn apply_job(tx: &Transaction<'_>, writes: &[Write], announce: &mut Announce) -> Result<()> {
    for w in writes {
        match w {
            Write::UpsertLease(l) => {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO leases (ip, mac, client_id, expires_at, hostname, state) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (ip) DO UPDATE SET mac = $2, client_id = $3, expires_at = $4, hostname = $5, state = $6",
                    )
                    .await
                    .map_err(pg_error)?;
                tx.execute(&st, &[&l.ip.to_string(), &l.mac, &l.client_id, &(l.expires_at as i64), &l.hostname, &l.state])
                    .await
                    .map_err(pg_error)?;
                announce.leases.push(LeaseNotice::bound(l));
            }
            Write::RemoveLease(ip) => {
                let st = tx.prepare_cached("DELETE FROM leases WHERE ip = $1 RETURNING mac").await.map_err(pg_error)?;
                for row in tx.query(&st, &[&ip.to_string()]).await.map_err(pg_error)? {
                    announce.leases.push(LeaseNotice::removed(*ip, row.get(0)));
                }
            }
            Write::UpsertProfile(p) => {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO profiles (name, json, source) VALUES ($1, $2, $3)
                         ON CONFLICT (name) DO UPDATE SET json = $2, source = $3",
                    )
                    .await
                    .map_err(pg_error)?;
                tx.execute(&st, &[&p.name, &p.json, &p.source]).await.map_err(pg_error)?;
                announce.profiles.insert(p.name.clone());
            }
            Write::DeleteProfile(name) => {
                tx.execute("DELETE FROM profiles WHERE name = $1", &[name]).await.map_err(pg_error)?;
                announce.profiles.insert(name.clone());
            }
            Write::InsertToken(t) => {
                // As SQLite's INSERT OR IGNORE: a live token of the same name or hash makes it a no-op.
                let st = tx
                    .prepare_cached(
                        "INSERT INTO api_tokens (name, role, sha256, created_ms, revoked_ms) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT DO NOTHING",
                    )
                    .await
                    .map_err(pg_error)?;
                tx.execute(&st, &[&t.name, &t.role, &t.sha256, &(t.created_ms as i64), &t.revoked_ms.map(|v| v as i64)])
                    .await
                    .map_err(pg_error)?;
            }
            Write::RevokeToken { id, at_ms } => {
                tx.execute("UPDATE api_tokens SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL", &[id, &(*at_ms as i64)])
                    .await
                    .map_err(pg_error)?;
            }
            Write::Audit(a) => {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO audit (ts_ms, actor, actor_id, action, target, before, after, remote)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .await
                    .map_err(pg_error)?;
                tx.execute(&st, &[&(a.ts_ms as i64), &a.actor, &a.actor_id, &a.action, &a.target, &a.before, &a.after, &a.remote])
                    .await
                    .map_err(pg_error)?;
            }
            Write::Trace(e) => {
                let st = tx.prepare_cached("INSERT INTO trace (ts_ms, mac, kind, detail) VALUES ($1, $2, $3, $4)").await.map_err(pg_error)?;
                tx.execute(&st, &[&(e.ts_ms as i64), &e.mac, &e.kind, &e.detail]).await.map_err(pg_error)?;
            }
            Write::Fleet { fence, write } => {
                fleet(tx, *fence, write).await?;
                announce.fleet = true;
            }
            // The config refuses `[origin]` and `[cache]` on a PostgreSQL store; a write
            // that gets here anyway is refused rather than lost.
            Write::UpsertOriginObject(_)
            | Write::UpsertHolding(_)
            | Write::ReplaceHoldings { .. }
            | Write::UpsertCacheObject(_)
            | Write::TrimEvictedCacheObjects { .. }
            | Write::UpsertCacheClient { .. }
            | Write::DeleteCacheClient(_)
            | Write::ReplaceCacheSite(_) => {
                return Err(StoreError::Postgres("edge cache and origin tables are kept in SQLite only".into()))
            }
        }
    }
    Ok(())
}

/// `crate::fleet::apply` on PostgreSQL. The meta row is locked (`FOR UPDATE`) until the
/// batch commits, so a fenced write and a newer master's claim are serialized: once the
/// claim has committed, no write of the older epoch passes.
async fn fleet(tx: &Transaction<'_>, fence: Option<u64>, w: &FleetWrite) -> Result<()> {
    let meta = tx.query_one("SELECT epoch, config_rev FROM fleet_meta WHERE id = 1 FOR UPDATE", &[]).await.map_err(pg_error)?;
    let epoch = meta.get::<_, i64>(0) as u64;
    let mut rev = meta.get::<_, i64>(1);
    if let Some(held) = fence {
        if held != epoch {
            return Err(StoreError::StaleEpoch { held, current: epoch });
        }
    }
    if w.is_config() {
        rev += 1;
        tx.execute("UPDATE fleet_meta SET config_rev = $1 WHERE id = 1", &[&rev]).await.map_err(pg_error)?;
    }
    let e = epoch as i64;
    let q = |sql: &'static str| async move { tx.prepare_cached(sql).await.map_err(pg_error) };
    match w {
        FleetWrite::PutNode { name, mac, json } => {
            let st = q("INSERT INTO fleet_nodes (name, mac, json, rev) VALUES ($1, $2, $3, $4)
                        ON CONFLICT (name) DO UPDATE SET mac = $2, json = $3, rev = $4")
            .await?;
            tx.execute(&st, &[name, mac, json, &rev]).await.map_err(pg_error)?;
        }
        FleetWrite::DeleteNode { name } => {
            tx.execute("DELETE FROM fleet_nodes WHERE name = $1", &[name]).await.map_err(pg_error)?;
            tx.execute("DELETE FROM fleet_node_state WHERE name = $1", &[name]).await.map_err(pg_error)?;
        }
        FleetWrite::PutClass { name, json } => {
            let st = q("INSERT INTO fleet_classes (name, json, rev) VALUES ($1, $2, $3)
                        ON CONFLICT (name) DO UPDATE SET json = $2, rev = $3")
            .await?;
            tx.execute(&st, &[name, json, &rev]).await.map_err(pg_error)?;
        }
        FleetWrite::DeleteClass { name } => {
            tx.execute("DELETE FROM fleet_classes WHERE name = $1", &[name]).await.map_err(pg_error)?;
        }
        FleetWrite::PutPackage { name, version, kind, json, added_ms } => {
            let st = q("INSERT INTO fleet_packages (name, version, kind, json, added_ms, rev) VALUES ($1, $2, $3, $4, $5, $6)
                        ON CONFLICT (name, version) DO NOTHING")
            .await?;
            tx.execute(&st, &[name, version, kind, json, &(*added_ms as i64), &rev]).await.map_err(pg_error)?;
        }
        FleetWrite::DeletePackage { name, version } => {
            tx.execute("DELETE FROM fleet_packages WHERE name = $1 AND version = $2", &[name, version]).await.map_err(pg_error)?;
        }
        FleetWrite::PutCampaign { id, json } => {
            let st = q("INSERT INTO fleet_campaigns (id, json, rev) VALUES ($1, $2, $3)
                        ON CONFLICT (id) DO UPDATE SET json = $2, rev = $3")
            .await?;
            tx.execute(&st, &[id, json, &rev]).await.map_err(pg_error)?;
        }
        FleetWrite::CampaignProgress { id, json } => {
            let st = q("UPDATE fleet_campaigns SET progress = $2 WHERE id = $1").await?;
            tx.execute(&st, &[id, json]).await.map_err(pg_error)?;
        }
        FleetWrite::PutNodeState { name, json } => {
            let st = q("INSERT INTO fleet_node_state (name, json, epoch) VALUES ($1, $2, $3)
                        ON CONFLICT (name) DO UPDATE SET json = $2, epoch = $3")
            .await?;
            tx.execute(&st, &[name, json, &e]).await.map_err(pg_error)?;
        }
        FleetWrite::Verification { ts_ms, node, result, detail } => {
            let st = q("INSERT INTO fleet_verifications (ts_ms, node, result, detail, epoch) VALUES ($1, $2, $3, $4, $5)").await?;
            tx.execute(&st, &[&(*ts_ms as i64), node, result, detail, &e]).await.map_err(pg_error)?;
        }
        FleetWrite::TrimVerifications { keep } => {
            let st = q("DELETE FROM fleet_verifications WHERE id <= (SELECT MAX(id) FROM fleet_verifications) - $1").await?;
            tx.execute(&st, &[&(*keep as i64)]).await.map_err(pg_error)?;
        }
        FleetWrite::ClaimEpoch { epoch: wanted } => {
            if *wanted <= epoch {
                return Err(StoreError::StaleEpoch { held: *wanted, current: epoch });
            }
            tx.execute("UPDATE fleet_meta SET epoch = $1 WHERE id = 1", &[&(*wanted as i64)]).await.map_err(pg_error)?;
        }
    }
    Ok(())
}

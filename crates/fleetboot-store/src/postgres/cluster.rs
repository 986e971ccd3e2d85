//! The master lease and replica reports on PostgreSQL (see `crate::cluster`). The lease
//! row and the epoch are locked (`FOR UPDATE`) for the attempt, on the database's clock.

use super::{notice_payload, pg_error, NoticeKind, PgStore, CHANNEL, NOW_MS};
use crate::cluster::{ClusterStatus, MasterClaim, MasterHolder, MasterLease, ReplicaReport, ReplicaRow};
use crate::Result;

fn holder(r: &tokio_postgres::Row) -> Option<MasterHolder> {
    let instance: Option<String> = r.get(0);
    instance.map(|instance| MasterHolder {
        instance,
        name: r.get::<_, Option<String>>(1).unwrap_or_default(),
        url: r.get::<_, Option<String>>(2).unwrap_or_default(),
        expires_ms: r.get::<_, i64>(3) as u64,
        since_ms: r.get::<_, i64>(4) as u64,
    })
}

pub(crate) async fn claim(pool: &deadpool_postgres::Pool, origin: &str, claim: &MasterClaim<'_>) -> Result<MasterLease> {
    let mut c = PgStore::client(pool).await?;
    let tx = c.transaction().await.map_err(pg_error)?;
    let row = tx
        .query_one(&format!("SELECT holder, name, url, expires_ms, since_ms, {NOW_MS} FROM fleet_master WHERE id = 1 FOR UPDATE"), &[])
        .await
        .map_err(pg_error)?;
    let current = holder(&row);
    let now = row.get::<_, i64>(5) as u64;
    let mut epoch = tx.query_one("SELECT epoch FROM fleet_meta WHERE id = 1 FOR UPDATE", &[]).await.map_err(pg_error)?.get::<_, i64>(0) as u64;
    let expires = (now + claim.ttl_ms) as i64;
    let (mine, taken) = match &current {
        Some(h) if h.instance == claim.instance => {
            tx.execute("UPDATE fleet_master SET expires_ms = $1, url = $2 WHERE id = 1", &[&expires, &claim.url]).await.map_err(pg_error)?;
            (true, false)
        }
        h if claim.may_take && h.as_ref().is_none_or(|h| h.expires_ms <= now) => {
            epoch += 1;
            tx.execute("UPDATE fleet_meta SET epoch = $1 WHERE id = 1", &[&(epoch as i64)]).await.map_err(pg_error)?;
            tx.execute(
                "UPDATE fleet_master SET holder = $1, name = $2, url = $3, expires_ms = $4, since_ms = $5 WHERE id = 1",
                &[&claim.instance, &claim.name, &claim.url, &expires, &(now as i64)],
            )
            .await
            .map_err(pg_error)?;
            // Backups and agents' masters hear of the new master at once.
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice_payload(origin, NoticeKind::Fleet, "master")])
                .await
                .map_err(pg_error)?;
            (true, true)
        }
        _ => (false, false),
    };
    let row = tx.query_one("SELECT holder, name, url, expires_ms, since_ms FROM fleet_master WHERE id = 1", &[]).await.map_err(pg_error)?;
    let holder = holder(&row);
    tx.commit().await.map_err(pg_error)?;
    Ok(MasterLease { holder, epoch, now_ms: now, mine, taken })
}

pub(crate) async fn release(pool: &deadpool_postgres::Pool, origin: &str, instance: &str) -> Result<()> {
    let mut c = PgStore::client(pool).await?;
    let tx = c.transaction().await.map_err(pg_error)?;
    let n = tx.execute("UPDATE fleet_master SET expires_ms = 0 WHERE id = 1 AND holder = $1", &[&instance]).await.map_err(pg_error)?;
    if n > 0 {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &notice_payload(origin, NoticeKind::Fleet, "master")]).await.map_err(pg_error)?;
    }
    tx.commit().await.map_err(pg_error)
}

pub(crate) async fn report(pool: &deadpool_postgres::Pool, r: &ReplicaReport) -> Result<()> {
    let c = PgStore::client(pool).await?;
    let sql = format!(
        "INSERT INTO fleet_replicas (name, instance, url, role, seen_ms, loaded_rev, blobs_wanted, blobs_missing, bytes_missing)
         VALUES ($1, $2, $3, $4, {NOW_MS}, $5, $6, $7, $8)
         ON CONFLICT (name) DO UPDATE SET instance = $2, url = $3, role = $4, seen_ms = {NOW_MS}, loaded_rev = $5,
             blobs_wanted = $6, blobs_missing = $7, bytes_missing = $8"
    );
    c.execute(
        &sql,
        &[
            &r.name,
            &r.instance,
            &r.url,
            &r.role,
            &(r.loaded_rev as i64),
            &(r.blobs_wanted as i64),
            &(r.blobs_missing as i64),
            &(r.bytes_missing as i64),
        ],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

pub(crate) async fn status(pool: &deadpool_postgres::Pool) -> Result<ClusterStatus> {
    let mut c = PgStore::client(pool).await?;
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_error)?;
    let row = tx
        .query_one(&format!("SELECT holder, name, url, expires_ms, since_ms, {NOW_MS} FROM fleet_master WHERE id = 1"), &[])
        .await
        .map_err(pg_error)?;
    let now = row.get::<_, i64>(5) as u64;
    let meta = tx.query_one("SELECT epoch, config_rev FROM fleet_meta WHERE id = 1", &[]).await.map_err(pg_error)?;
    let replicas = tx
        .query(
            "SELECT name, instance, url, role, seen_ms, loaded_rev, blobs_wanted, blobs_missing, bytes_missing
             FROM fleet_replicas ORDER BY name",
            &[],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| ReplicaRow {
            report: ReplicaReport {
                name: r.get(0),
                instance: r.get(1),
                url: r.get(2),
                role: r.get(3),
                loaded_rev: r.get::<_, i64>(5) as u64,
                blobs_wanted: r.get::<_, i64>(6) as u64,
                blobs_missing: r.get::<_, i64>(7) as u64,
                bytes_missing: r.get::<_, i64>(8) as u64,
            },
            seen_ms: r.get::<_, i64>(4) as u64,
        })
        .collect();
    tx.commit().await.map_err(pg_error)?;
    Ok(ClusterStatus {
        lease: MasterLease { holder: holder(&row), epoch: meta.get::<_, i64>(0) as u64, now_ms: now, mine: false, taken: false },
        config_rev: meta.get::<_, i64>(1) as u64,
        replicas,
    })
}

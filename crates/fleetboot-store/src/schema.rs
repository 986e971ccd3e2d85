//! Schema migrations, applied in order. Append new steps; never edit a shipped one.
//! Both backends run the same steps: write them in the portable subset `dialect.rs`
//! describes (PostgreSQL gets the type names mapped).

use rusqlite::Connection;

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: leases, profiles, trace
    "CREATE TABLE leases (
        ip TEXT PRIMARY KEY,
        mac TEXT NOT NULL,
        client_id BLOB,
        expires_at INTEGER NOT NULL,
        hostname TEXT,
        state TEXT NOT NULL
     );
     CREATE TABLE profiles (
        name TEXT PRIMARY KEY,
        json TEXT NOT NULL,
        source TEXT NOT NULL
     );
     CREATE TABLE trace (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        mac TEXT NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL
     );
     CREATE INDEX trace_by_mac ON trace (mac, id);",
    // 2: the provisioning master's node and package databases. Configuration rows (nodes,
    // classes, packages, prepare campaigns) bump fleet_meta.config_rev so a master sees an
    // operator's change; every master write is fenced by fleet_meta.epoch.
    "CREATE TABLE fleet_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch INTEGER NOT NULL,
        config_rev INTEGER NOT NULL
     );
     INSERT INTO fleet_meta (id, epoch, config_rev) VALUES (1, 0, 0);
     CREATE TABLE fleet_nodes (
        name TEXT PRIMARY KEY,
        mac TEXT NOT NULL UNIQUE,
        json TEXT NOT NULL,
        rev INTEGER NOT NULL
     );
     CREATE TABLE fleet_classes (
        name TEXT PRIMARY KEY,
        json TEXT NOT NULL,
        rev INTEGER NOT NULL
     );
     CREATE TABLE fleet_packages (
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        kind TEXT NOT NULL,
        json TEXT NOT NULL,
        added_ms INTEGER NOT NULL,
        rev INTEGER NOT NULL,
        PRIMARY KEY (name, version)
     );
     CREATE TABLE fleet_campaigns (
        id TEXT PRIMARY KEY,
        json TEXT NOT NULL,
        rev INTEGER NOT NULL,
        progress TEXT
     );
     CREATE TABLE fleet_node_state (
        name TEXT PRIMARY KEY,
        json TEXT NOT NULL,
        epoch INTEGER NOT NULL
     );
     CREATE TABLE fleet_verifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        node TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL,
        epoch INTEGER NOT NULL
     );
     CREATE INDEX fleet_verifications_by_node ON fleet_verifications (node, id);",
    // 3: API tokens (only their SHA-256) and the audit log of every change
    "CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        sha256 TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL,
        revoked_ms INTEGER
     );
     CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_ms IS NULL;
     CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        actor_id INTEGER,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after TEXT,
        remote TEXT
     );",
    // 4: several servers on one store. DHCP servers' heartbeats (who is alive decides who
    // answers which client); the master lease (one active master; taking it claims the
    // next epoch); each master's and backup's replication report. Times are Unix ms on
    // the database's clock.
    "CREATE TABLE dhcp_servers (
        name TEXT PRIMARY KEY,
        seen_ms INTEGER NOT NULL,
        started_ms INTEGER NOT NULL
     );
     CREATE TABLE fleet_master (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT,
        name TEXT,
        url TEXT,
        expires_ms INTEGER NOT NULL,
        since_ms INTEGER NOT NULL
     );
     INSERT INTO fleet_master (id, holder, name, url, expires_ms, since_ms) VALUES (1, NULL, NULL, NULL, 0, 0);
     CREATE TABLE fleet_replicas (
        name TEXT PRIMARY KEY,
        instance TEXT NOT NULL,
        url TEXT NOT NULL,
        role TEXT NOT NULL,
        seen_ms INTEGER NOT NULL,
        loaded_rev INTEGER NOT NULL,
        blobs_wanted INTEGER NOT NULL,
        blobs_missing INTEGER NOT NULL,
        bytes_missing INTEGER NOT NULL
     );",
    // 5: edge boot caches. At an origin: the versions it published of each object, and
    // what each of its caches holds (the origin's verification table). At a cache: its own
    // verification table, the image map (each client's plan) and the site's versions.
    "CREATE TABLE origin_objects (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (name, version)
     );
     CREATE TABLE origin_holdings (
        cache TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL,
        changed_ms INTEGER NOT NULL,
        PRIMARY KEY (cache, name, version)
     );
     CREATE TABLE cache_objects (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        state TEXT NOT NULL,
        pinned INTEGER NOT NULL,
        last_used_ms INTEGER NOT NULL,
        changed_ms INTEGER NOT NULL,
        PRIMARY KEY (name, version)
     );
     CREATE TABLE cache_clients (
        mac TEXT PRIMARY KEY,
        plan TEXT NOT NULL,
        learned_ms INTEGER NOT NULL
     );
     CREATE TABLE cache_site (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL
     );",
];

pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version = |c: &Connection| c.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).map(|v| v as usize);
    let current = version(conn)?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current) {
        // Another process may be migrating the same file at the same moment (`fleetboot
        // nbd` starting beside `fleetboot serve`): each step takes the write lock first and
        // looks again at where the file is, so a step is applied once.
        let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
        if version(&tx)? > i {
            continue;
        }
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_migrating_one_file_at_once_apply_each_step_once() {
        let dir = std::env::temp_dir().join(format!("fleetboot-schema-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("race.db");
        let _ = std::fs::remove_file(&path);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let conn = Connection::open(&path).unwrap();
                    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                    migrate(&conn)
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().expect("every opener migrates or finds it done");
        }
        let conn = Connection::open(&path).unwrap();
        assert_eq!(conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0)).unwrap() as usize, MIGRATIONS.len());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

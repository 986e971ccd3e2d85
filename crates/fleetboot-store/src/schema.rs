//! Schema migrations, applied in order. Append new steps; never edit a shipped one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
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
];

pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let current: usize = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

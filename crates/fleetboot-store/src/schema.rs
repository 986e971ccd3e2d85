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
    // 2: API tokens (only their SHA-256) and the audit log of every change
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

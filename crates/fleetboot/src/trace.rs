//! `fleetboot trace MAC`: one client's boot, event by event, read from a server's store.

use crate::config::Config;
use anyhow::{Context, Result};
use fleetboot_boot::MacAddr;
use std::path::Path;

/// Prints the newest `limit` events of `mac` from the store of the server using `config`:
/// a timeline, or a JSON array of `{ts_ms, mac, kind, detail}`.
pub fn print(mac: MacAddr, config: &Path, json: bool, limit: usize) -> Result<()> {
    let config = Config::load(config)?;
    let events = if config.store.is_shared() {
        config.open_store()?.trace(&mac.to_string(), limit)?
    } else {
        let store = fleetboot_store::ReadOnlyStore::open(&config.db_path())
            .with_context(|| "has this server run yet? (fleetboot serve creates the store)")?;
        store.trace(&mac.to_string(), limit)?
    };
    if json {
        let v: Vec<_> = events
            .iter()
            .map(|e| serde_json::json!({"ts_ms": e.ts_ms, "mac": e.mac, "kind": e.kind, "detail": e.detail}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if events.is_empty() {
        println!("no events for {mac}");
    }
    let t0 = events.first().map(|e| e.ts_ms).unwrap_or(0);
    for e in &events {
        println!("{} +{:>8.3}s  {:<16} {}", format_ms(e.ts_ms), (e.ts_ms - t0) as f64 / 1000.0, e.kind, e.detail);
    }
    Ok(())
}

/// Unix milliseconds as a UTC time of day, `13:04:05.123Z`.
pub fn format_ms(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ts_ms % 1000)
}

//! `fleetboot audit`: who changed what, read from a server's store.

use crate::config::Config;
use anyhow::{Context, Result};
use std::path::Path;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Read the store of the server using this config.
    #[arg(long, short)]
    config: std::path::PathBuf,
    /// Print JSON (an array of {id, ts_ms, actor, actor_id, action, target, before, after, remote}).
    #[arg(long)]
    json: bool,
    /// At most this many of the newest entries.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Only entries after this id (for following the log).
    #[arg(long)]
    after: Option<i64>,
}

pub fn run(args: AuditArgs) -> Result<()> {
    print(&args.config, args.json, args.limit, args.after)
}

pub fn print(config: &Path, json: bool, limit: usize, after: Option<i64>) -> Result<()> {
    let config = Config::load(config)?;
    let store = fleetboot_store::ReadOnlyStore::open(&config.db_path())
        .with_context(|| "has this server run yet? (fleetboot serve creates the store)")?;
    let entries = store
        .audit(after, limit)
        .with_context(|| "reading the audit log (a store from an older fleetboot is upgraded by its next `fleetboot serve`)")?;
    if json {
        let v: Vec<_> = entries.iter().map(crate::serve::admin::audit_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no changes recorded");
    }
    for e in &entries {
        let who = match e.actor_id {
            Some(id) => format!("{} (token {id})", e.actor),
            None => e.actor.clone(),
        };
        let from = e.remote.as_deref().map(|r| format!(" from {r}")).unwrap_or_default();
        println!("{:>5} {}  {who}{from}  {}  {}", e.id, format_utc(e.ts_ms), e.action, e.target);
        for (label, v) in [("before", &e.before), ("after", &e.after)] {
            if let Some(v) = v {
                println!("        {label:<6} {}", shorten(v, 300));
            }
        }
    }
    Ok(())
}

fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Unix milliseconds as `2026-03-01T13:04:05Z` (UTC).
pub fn format_utc(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_709_294_645_123), "2024-03-01T12:04:05Z");
    }
}

//! The `[trace]` section of fleetboot's config file: how many boot-trace events may wait to
//! be written, how many are kept and for how long, and how often one client's identical
//! event is recorded. Raw serde type ([`RawTrace`], `deny_unknown_fields`) validated into
//! [`TraceLimits`], errors naming the key as written in the section.

use serde::Deserialize;
use std::time::Duration;

/// A key of the section that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

/// The `[trace]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrace {
    queue: Option<usize>,
    max_rows: Option<u64>,
    max_rows_per_mac: Option<u64>,
    max_age_days: Option<u64>,
    repeat_window_secs: Option<u64>,
    repeat_slots: Option<usize>,
}

/// Bounds on the boot trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceLimits {
    /// Events waiting for the writer; beyond this new events are dropped (and counted)
    /// rather than ever holding up a lease commit.
    pub queue: usize,
    /// Rows kept in all: the oldest go first.
    pub max_rows: u64,
    /// Rows kept per client MAC: its oldest go first.
    pub max_rows_per_mac: u64,
    /// Rows older than this are deleted (checked every minute).
    pub max_age: Duration,
    /// An event identical to one of the same client (kind and detail) recorded less than
    /// this long ago is counted, not written. Off (0) by default: a lease renewed with the
    /// same address, or a client asking again for a file it was refused, is part of the
    /// story an operator reads in a trace; the queue and row limits bound a flood anyway.
    pub repeat_window: Duration,
    /// How many recent events are remembered to recognise repeats (a fixed table).
    pub repeat_slots: usize,
}

impl Default for TraceLimits {
    fn default() -> Self {
        TraceLimits {
            queue: 10_000,
            max_rows: 1_000_000,
            max_rows_per_mac: 2_000,
            max_age: Duration::from_secs(30 * 86_400),
            repeat_window: Duration::ZERO,
            repeat_slots: 65_536,
        }
    }
}

fn refuse<T>(key: &str, problem: String) -> Result<T, ConfigError> {
    Err(ConfigError { key: key.into(), problem })
}

impl RawTrace {
    pub fn validate(self) -> Result<TraceLimits, ConfigError> {
        let d = TraceLimits::default();
        let queue = self.queue.unwrap_or(d.queue);
        if !(16..=10_000_000).contains(&queue) {
            return refuse("queue", format!("{queue} is outside 16..=10000000"));
        }
        let max_rows = self.max_rows.unwrap_or(d.max_rows);
        if max_rows < 1_000 {
            return refuse("max_rows", format!("{max_rows} is below 1000"));
        }
        let max_rows_per_mac = self.max_rows_per_mac.unwrap_or(d.max_rows_per_mac);
        if max_rows_per_mac < 10 || max_rows_per_mac > max_rows {
            return refuse("max_rows_per_mac", format!("{max_rows_per_mac} must be at least 10 and at most max_rows ({max_rows})"));
        }
        let days = self.max_age_days.unwrap_or(d.max_age.as_secs() / 86_400);
        if !(1..=3650).contains(&days) {
            return refuse("max_age_days", format!("{days} is outside 1..=3650"));
        }
        let window = self.repeat_window_secs.unwrap_or(d.repeat_window.as_secs());
        if window > 86_400 {
            return refuse("repeat_window_secs", format!("{window} is above 86400 (0 records every repeat)"));
        }
        let repeat_slots = self.repeat_slots.unwrap_or(d.repeat_slots);
        if !(1..=16_777_216).contains(&repeat_slots) {
            return refuse("repeat_slots", format!("{repeat_slots} is outside 1..=16777216"));
        }
        Ok(TraceLimits {
            queue,
            max_rows,
            max_rows_per_mac,
            max_age: Duration::from_secs(days * 86_400),
            repeat_window: Duration::from_secs(window),
            repeat_slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> Result<TraceLimits, ConfigError> {
        toml::from_str::<RawTrace>(text).unwrap().validate()
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        assert_eq!(section("").unwrap(), TraceLimits::default());
        let c = section("max_rows = 5000\nmax_rows_per_mac = 50\nmax_age_days = 2\nrepeat_window_secs = 0").unwrap();
        assert_eq!((c.max_rows, c.max_rows_per_mac, c.max_age.as_secs(), c.repeat_window), (5000, 50, 172_800, Duration::ZERO));
        let key = |t: &str| section(t).unwrap_err().key;
        assert_eq!(key("queue = 1"), "queue");
        assert_eq!(key("max_rows = 10"), "max_rows");
        assert_eq!(key("max_rows = 1000\nmax_rows_per_mac = 1001"), "max_rows_per_mac");
        assert_eq!(key("max_age_days = 0"), "max_age_days");
        assert_eq!(key("repeat_window_secs = 100000"), "repeat_window_secs");
        assert_eq!(key("repeat_slots = 0"), "repeat_slots");
        assert!(toml::from_str::<RawTrace>("rows = 1").is_err());
    }
}

//! The key negotiators and file servers authenticate each other's messages with
//! (`fleetboot_negotiate::auth`), and the report of what they refused.
//!
//! Where: `negotiate.peer_key_file` / `files.peer_key_file`, else `data_dir/negotiate.key`;
//! 64 hex digits, mode 0600 (refused when others may read it). When it does not exist:
//! - a file server makes it: it cannot know how many negotiators will use it, and every
//!   one of them needs its key;
//! - so does a lone negotiator (no peer group, no listed peer but itself and its file
//!   servers), and one whose config runs a file server too (`fleetboot serve` with
//!   `[files]`), so one host on its own needs no setup;
//! - a negotiator with other negotiators refuses to start, naming the key: several hosts
//!   must share one key, which none of them can make up alone.

use crate::config::Config;
use crate::serve::shared::LogLimit;
use anyhow::{bail, Context, Result};
use fleetboot_negotiate::{PeerAuth, PeerKey, Refusal, Refusals};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Which side asks for the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Negotiator,
    FileServer,
}

impl Side {
    fn section(self) -> &'static str {
        match self {
            Side::Negotiator => "negotiate",
            Side::FileServer => "files",
        }
    }
}

/// The key file `side` of `config` uses.
pub fn key_path(config: &Config, side: Side) -> PathBuf {
    let explicit = match side {
        Side::Negotiator => config.negotiate.as_ref().and_then(|n| n.peer_key_file.clone()),
        Side::FileServer => config.files.as_ref().and_then(|f| f.peer_key_file.clone()),
    };
    explicit.unwrap_or_else(|| config.data_dir.join("negotiate.key"))
}

fn make_key() -> Result<String, fleetboot_auth::SecretError> {
    let mut k = [0u8; 32];
    fleetboot_auth::random(&mut k)?;
    Ok(format!("{}\n", fleetboot_auth::hex(&k)))
}

/// The authentication state `side` of `config` runs with (see the module documentation
/// for when the key is made and when its absence is an error).
pub fn peer_auth(config: &Config, side: Side) -> Result<PeerAuth> {
    let path = key_path(config, side);
    let me = config.address;
    let may_create = match (side, &config.negotiate) {
        (Side::FileServer, _) => true,
        (Side::Negotiator, Some(n)) => !n.has_other_negotiators(me) || config.files.is_some(),
        (Side::Negotiator, None) => false,
    };
    let exists = std::fs::symlink_metadata(&path).is_ok();
    if !exists && !may_create {
        bail!(
            "{}.peer_key_file: no key at {}. Negotiators that clear groups with each other share one key with each other and with \
             their file servers (64 hex digits, mode 0600): copy the one a file server made (its data_dir/negotiate.key) here, or \
             make one with `umask 077; openssl rand -hex 32 > {}` and copy it to every negotiator and file server",
            side.section(),
            path.display(),
            path.display()
        );
    }
    if !exists {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let text = fleetboot_auth::secret::load_or_create(&path, make_key).with_context(|| format!("{}.peer_key_file", side.section()))?;
    let key = PeerKey::from_hex(&text).with_context(|| format!("{}.peer_key_file {}", side.section(), path.display()))?;
    if !exists {
        tracing::warn!(
            path = %path.display(),
            "made the key negotiators and file servers authenticate each other with: every negotiator and file server that works with this one needs a copy ({}.peer_key_file)",
            side.section()
        );
    }
    let now = Instant::now();
    let unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let auth = PeerAuth::new(key, me, now, unix_us);
    Ok(match (side, config.negotiate.as_ref().and_then(|n| n.accepted_senders(me))) {
        (Side::Negotiator, Some(senders)) => auth.only_from(senders),
        _ => auth,
    })
}

/// Random bits for the negotiator's first transaction id.
pub fn xid_seed() -> u32 {
    let mut b = [0u8; 4];
    let _ = fleetboot_auth::random(&mut b);
    u32::from_be_bytes(b)
}

/// Turns the refusals a machine counted into `fleetboot_negotiate_refused_total{role,
/// reason}`, a warning at most every 10 s naming the last sender and why, and a `refused`
/// record (the totals so far) at most every second.
pub struct RefusalReport {
    role: &'static str,
    key: PathBuf,
    reported: Refusals,
    log: LogLimit,
    recorded: Option<Instant>,
    unrecorded: bool,
}

impl RefusalReport {
    pub fn new(role: &'static str, key: &Path) -> RefusalReport {
        RefusalReport {
            role,
            key: key.to_path_buf(),
            reported: Refusals::default(),
            log: LogLimit::new(Duration::from_secs(10)),
            recorded: None,
            unrecorded: false,
        }
    }

    /// Reports what `now` counted since the last call; writes the totals to `rec` when a
    /// second has passed since the last such record.
    pub fn update(&mut self, now: Option<&Refusals>, rec: &super::net::Records, server: std::net::Ipv4Addr) {
        self.count(now);
        let due = self.recorded.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if self.unrecorded && due {
            self.recorded = Some(Instant::now());
            self.unrecorded = false;
            let counts: serde_json::Map<String, serde_json::Value> =
                Refusal::ALL.iter().map(|r| (r.label().to_string(), self.reported.get(*r).into())).collect();
            rec.write(serde_json::json!({"ts_ms": super::net::unix_ms(), "role": self.role, "server": server.to_string(),
                "event": "refused", "total": self.reported.total(), "counts": counts,
                "last_from": self.reported.last.map(|(a, _)| a.to_string())}));
        }
    }

    fn count(&mut self, now: Option<&Refusals>) {
        let Some(now) = now else { return };
        if now.total() == self.reported.total() {
            return;
        }
        for r in Refusal::ALL {
            let new = now.get(r).saturating_sub(self.reported.get(r));
            if new > 0 {
                metrics::counter!("fleetboot_negotiate_refused_total", "role" => self.role, "reason" => r.label()).increment(new);
            }
        }
        let new_total = now.total() - self.reported.total();
        self.reported = now.clone();
        self.unrecorded = true;
        if let (Some(held_back), Some((from, why))) = (self.log.allow(), now.last) {
            tracing::warn!(
                role = self.role,
                %from,
                reason = why.label(),
                dropped = new_total,
                held_back,
                key = %self.key.display(),
                "negotiation messages dropped: they did not authenticate (a host without this key, a forgery or a replay)"
            );
        }
    }
}

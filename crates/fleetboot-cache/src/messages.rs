//! What caches and their origin say to each other, as JSON bodies (signed as
//! [`crate::auth`] says). Every list is bounded on parse ([`MAX_ITEMS`]) and every body by
//! [`MAX_BODY`]: a peer that sends more is refused, not followed.

use crate::hash::{from_hex, Digest};
use crate::table::Holding;
use serde::{Deserialize, Serialize};

/// Largest control body either side accepts.
pub const MAX_BODY: usize = 1 << 20;
/// Most entries in any list of a control message.
pub const MAX_ITEMS: usize = 10_000;

/// One version of one object, as the origin hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub name: String,
    pub version: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
}

impl ObjectRef {
    pub fn digest(&self) -> Option<Digest> {
        from_hex::<32>(&self.sha256)
    }

    fn check(&self) -> Result<(), String> {
        crate::name::validate(&self.name).map_err(|e| format!("{}: {e}", self.name))?;
        self.digest().map(|_| ()).ok_or_else(|| format!("{}: sha256 is not 64 hex characters", self.name))
    }
}

/// What one client boots, from the origin: its iPXE script (rendered for the cache's site)
/// and the objects the script names, at the versions this client is to get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientPlan {
    /// `52:54:00:77:00:10`
    pub mac: String,
    pub script: String,
    pub objects: Vec<ObjectRef>,
    /// Unix ms when the origin made it.
    pub issued_ms: u64,
}

/// An object the origin wants a cache to hold ahead of time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prestage {
    pub object: ObjectRef,
    /// Held against eviction until the origin says otherwise.
    pub pin: bool,
}

/// The origin's standing orders for one cache. `seq` grows with every change, and a cache
/// long-polls for the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Directives {
    pub seq: u64,
    /// The site's image map: for each object name, the version its clients get now.
    pub current: Vec<ObjectRef>,
    /// Objects to fetch and hold (new versions of what the cache holds, prestaged images).
    pub prestage: Vec<Prestage>,
    pub issued_ms: u64,
}

/// A cache's counters, sent with its reports (shown by the origin per cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    pub bytes_from_origin: u64,
    pub bytes_served: u64,
    pub corrupt_chunks: u64,
}

/// State changes of a cache's verification table, sent as they happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub changes: Vec<Holding>,
    #[serde(default)]
    pub counters: CacheCounters,
    /// Set on the first report after the cache starts: the origin replaces its table of
    /// this cache with `changes` (which is then everything the cache holds).
    #[serde(default)]
    pub full: bool,
}

/// The origin's answer to a report: the directives' current `seq`, so a cache that missed
/// one knows to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportAck {
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MessageError(pub String);

fn bounded<T>(what: &str, v: &[T]) -> Result<(), MessageError> {
    if v.len() > MAX_ITEMS {
        return Err(MessageError(format!("{what}: {} entries (at most {MAX_ITEMS})", v.len())));
    }
    Ok(())
}

/// Parses a control body: size, JSON shape, bounds, names and digests.
pub trait Message: Sized + for<'de> Deserialize<'de> {
    fn check(&self) -> Result<(), MessageError>;

    fn parse(body: &[u8]) -> Result<Self, MessageError> {
        if body.len() > MAX_BODY {
            return Err(MessageError(format!("body of {} bytes (at most {MAX_BODY})", body.len())));
        }
        let m: Self = serde_json::from_slice(body).map_err(|e| MessageError(e.to_string()))?;
        m.check()?;
        Ok(m)
    }
}

impl Message for ClientPlan {
    fn check(&self) -> Result<(), MessageError> {
        bounded("objects", &self.objects)?;
        for o in &self.objects {
            o.check().map_err(MessageError)?;
        }
        if !self.script.starts_with("#!ipxe") {
            return Err(MessageError("script does not start with #!ipxe".into()));
        }
        Ok(())
    }
}

impl Message for Directives {
    fn check(&self) -> Result<(), MessageError> {
        bounded("current", &self.current)?;
        bounded("prestage", &self.prestage)?;
        for o in self.current.iter().chain(self.prestage.iter().map(|p| &p.object)) {
            o.check().map_err(MessageError)?;
        }
        Ok(())
    }
}

impl Message for Report {
    fn check(&self) -> Result<(), MessageError> {
        bounded("changes", &self.changes)?;
        for h in &self.changes {
            crate::name::validate(&h.name).map_err(|e| MessageError(format!("{}: {e}", h.name)))?;
            if from_hex::<32>(&h.sha256).is_none() {
                return Err(MessageError(format!("{}: sha256 is not 64 hex characters", h.name)));
            }
        }
        Ok(())
    }
}

impl Message for ReportAck {
    fn check(&self) -> Result<(), MessageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::State;

    fn obj(name: &str) -> ObjectRef {
        ObjectRef { name: name.into(), version: 1, sha256: "ab".repeat(32) }
    }

    #[test]
    fn plans_round_trip_and_bad_ones_are_refused() {
        let p = ClientPlan { mac: "52:54:00:77:00:10".into(), script: "#!ipxe\nboot\n".into(), objects: vec![obj("files/vmlinuz")], issued_ms: 1 };
        assert_eq!(ClientPlan::parse(&serde_json::to_vec(&p).unwrap()).unwrap(), p);
        let mut bad = p.clone();
        bad.objects[0].name = "files/../x".into();
        assert!(ClientPlan::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        bad = p.clone();
        bad.objects[0].sha256 = "00".into();
        assert!(ClientPlan::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        bad = p.clone();
        bad.script = "echo".into();
        assert!(ClientPlan::parse(&serde_json::to_vec(&bad).unwrap()).is_err());
        assert!(ClientPlan::parse(b"{\"mac\":1}").is_err());
        assert!(ClientPlan::parse(&vec![b' '; MAX_BODY + 1]).is_err());
    }

    #[test]
    fn lists_are_bounded() {
        let d = Directives { seq: 1, current: vec![obj("files/a"); MAX_ITEMS + 1], prestage: vec![], issued_ms: 0 };
        assert!(Directives::parse(&serde_json::to_vec(&d).unwrap()).is_err());
        let r = Report {
            changes: vec![Holding { name: "files/a".into(), version: 1, sha256: "cd".repeat(32), state: State::Verified, changed_ms: 5 }],
            counters: CacheCounters::default(),
            full: true,
        };
        assert_eq!(Report::parse(&serde_json::to_vec(&r).unwrap()).unwrap(), r);
    }
}

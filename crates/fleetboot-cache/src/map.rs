//! The image map at a cache: which client boots what (its plan, as the origin last gave
//! it) and which version of each object the site's clients get now. Learned from the
//! origin while it is reachable, so boots go on from what the cache holds while the
//! origin or the WAN is down — and a client whose boot needs something the cache does not
//! hold verified is told exactly that ([`Refusal`]).

use crate::messages::{ClientPlan, ObjectRef};
use std::collections::{BTreeMap, HashMap};

/// Why a client cannot boot from this cache while its origin is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("{mac} is not in this cache's image map and the origin is unreachable ({why})")]
    UnknownClient { mac: String, why: String },
    #[error("{name} version {version} is not held verified at this cache and the origin is unreachable ({why})")]
    NotHeld { name: String, version: u64, why: String },
}

#[derive(Debug, Clone)]
pub struct ImageMap {
    plans: HashMap<String, ClientPlan>,
    /// (learned at ms, mac): the oldest plan goes when the map is full.
    order: BTreeMap<(u64, String), ()>,
    learned: HashMap<String, u64>,
    current: HashMap<String, ObjectRef>,
    max_clients: usize,
}

impl ImageMap {
    pub fn new(max_clients: usize) -> ImageMap {
        ImageMap {
            plans: HashMap::new(),
            order: BTreeMap::new(),
            learned: HashMap::new(),
            current: HashMap::new(),
            max_clients: max_clients.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// Records a client's plan (replacing the one before). Returns the MAC of a client
    /// whose plan was dropped to stay within `max_clients`.
    pub fn learn(&mut self, plan: ClientPlan, now_ms: u64) -> Option<String> {
        let mac = plan.mac.clone();
        if let Some(old) = self.learned.insert(mac.clone(), now_ms) {
            self.order.remove(&(old, mac.clone()));
        }
        self.order.insert((now_ms, mac.clone()), ());
        self.plans.insert(mac, plan);
        if self.plans.len() > self.max_clients {
            let ((_, oldest), _) = self.order.pop_first()?;
            self.plans.remove(&oldest);
            self.learned.remove(&oldest);
            return Some(oldest);
        }
        None
    }

    pub fn plan(&self, mac: &str) -> Option<&ClientPlan> {
        self.plans.get(mac)
    }

    pub fn plans(&self) -> impl Iterator<Item = &ClientPlan> {
        self.plans.values()
    }

    /// The site's current versions, as the origin's directives say.
    pub fn set_current(&mut self, refs: Vec<ObjectRef>) {
        self.current = refs.into_iter().map(|r| (r.name.clone(), r)).collect();
    }

    pub fn current(&self, name: &str) -> Option<&ObjectRef> {
        self.current.get(name)
    }

    pub fn currents(&self) -> impl Iterator<Item = &ObjectRef> {
        self.current.values()
    }

    /// The version of `name` a client gets: its own plan's, else the site's current.
    pub fn version_for(&self, mac: Option<&str>, name: &str) -> Option<&ObjectRef> {
        mac.and_then(|m| self.plans.get(m))
            .and_then(|p| p.objects.iter().find(|o| o.name == name))
            .or_else(|| self.current.get(name))
    }

    /// With the origin unreachable (`why`): the plan `mac` may boot from, if the cache holds
    /// every object it names verified (`held`).
    pub fn offline_plan(&self, mac: &str, why: &str, held: impl Fn(&ObjectRef) -> bool) -> Result<&ClientPlan, Refusal> {
        let plan = self.plans.get(mac).ok_or_else(|| Refusal::UnknownClient { mac: mac.to_string(), why: why.to_string() })?;
        match plan.objects.iter().find(|o| !held(o)) {
            Some(o) => Err(Refusal::NotHeld { name: o.name.clone(), version: o.version, why: why.to_string() }),
            None => Ok(plan),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, version: u64) -> ObjectRef {
        ObjectRef { name: name.into(), version, sha256: "aa".repeat(32) }
    }

    fn plan(mac: &str, objects: Vec<ObjectRef>) -> ClientPlan {
        ClientPlan { mac: mac.into(), script: "#!ipxe\n".into(), objects, issued_ms: 0 }
    }

    #[test]
    fn offline_boots_need_the_plan_and_every_object() {
        let mut m = ImageMap::new(10);
        m.learn(plan("m1", vec![obj("files/k", 1), obj("files/i", 1)]), 1);
        m.learn(plan("m2", vec![obj("files/k2", 3)]), 2);
        let held = |o: &ObjectRef| o.name != "files/k2";
        assert!(m.offline_plan("m1", "down", held).is_ok());
        let e = m.offline_plan("m2", "connect timed out", held).unwrap_err();
        assert_eq!(e.to_string(), "files/k2 version 3 is not held verified at this cache and the origin is unreachable (connect timed out)");
        let e = m.offline_plan("m3", "down", held).unwrap_err();
        assert!(matches!(e, Refusal::UnknownClient { .. }), "{e}");
    }

    #[test]
    fn the_map_is_bounded_oldest_first_and_versions_come_from_the_plan() {
        let mut m = ImageMap::new(2);
        assert_eq!(m.learn(plan("a", vec![obj("files/k", 1)]), 1), None);
        assert_eq!(m.learn(plan("b", vec![]), 2), None);
        assert_eq!(m.learn(plan("a", vec![obj("files/k", 2)]), 3), None, "relearning is no growth");
        assert_eq!(m.learn(plan("c", vec![]), 4), Some("b".into()));
        assert_eq!(m.len(), 2);
        m.set_current(vec![obj("files/k", 5)]);
        assert_eq!(m.version_for(Some("a"), "files/k").unwrap().version, 2);
        assert_eq!(m.version_for(Some("c"), "files/k").unwrap().version, 5);
        assert_eq!(m.version_for(None, "files/k").unwrap().version, 5);
        assert!(m.version_for(None, "files/x").is_none());
    }
}

//! Several masters, one active: the master lease, taking over, and the backups' copies.
//!
//! Every `fleetboot master` (and the master inside `fleetboot serve`) of one fleet shares
//! the store and takes part in its master lease (`fleetboot_store::cluster`):
//!
//! - **the holder** serves agents and renews the lease every third of `lease_ttl_ms`. A
//!   renewal that finds the lease gone, a fenced write refused with `StaleEpoch`, or no
//!   successful renewal for a whole TTL (the store unreachable) stops it serving at once:
//!   it answers agents "not the master" and goes on as a backup;
//! - **a backup** answers agents' exchanges with `503 {"not_master": true, "master": URL}`
//!   (agents move on to that URL), keeps its databases loaded, keeps its own copy of every
//!   blob the package database names (fetched from the other masters, checked against its
//!   SHA-256 before it is kept), and claims the lease once it has expired for its rank's
//!   wait ([`FleetConfig::takeover_wait_ms`]: the operator's designated order first, then
//!   whoever comes). Taking the lease claims the next epoch; the new master then reloads
//!   everything from the store — what the old one made durable is all there is, since it
//!   persisted before replying.
//!
//! Every master and backup reports itself every heartbeat (role, configuration revision
//! loaded, blobs wanted and missing): `fleetboot master status` shows it.
//!
//! Masters fetch blobs from each other on `GET /fleet/v1/replica/blobs/{sha256}`, signed
//! like an agent's request but with the fleet's master key (which every master holds,
//! see `docs/security.md`): only another master of the fleet can ask.

use super::service::MasterService;
use anyhow::{bail, Context, Result};
use fleetboot_fleet::config::FleetConfig;
use fleetboot_fleet::protocol::{nonce, Envelope, KeyPair};
use fleetboot_fleet::Sha256;
use fleetboot_store::cluster::{MasterClaim, ReplicaReport};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who this master is among the fleet's masters.
#[derive(Debug, Clone)]
pub struct ReplicaIdentity {
    pub name: String,
    /// Unique per process: a restarted master is a new lease holder.
    pub instance: String,
    pub url: String,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into())
}

/// `[fleet] name` (default: the host's name) and `url` (default: `http://` the listen
/// address, the host's name in place of an unspecified address).
pub fn identity(config: &FleetConfig, listen: Option<SocketAddr>) -> Result<ReplicaIdentity> {
    let name = config.name.clone().unwrap_or_else(|| hostname().split('.').next().unwrap_or("localhost").to_string());
    let url = match (&config.url, listen) {
        (Some(u), _) => u.clone(),
        (None, Some(a)) if a.ip().is_unspecified() => format!("http://{}:{}", hostname(), a.port()),
        (None, Some(a)) => format!("http://{a}"),
        (None, None) => {
            tracing::warn!("fleet.url: no listen address to derive it from; backups cannot send agents to this master (set fleet.url)");
            String::new()
        }
    };
    let instance = format!("{name}-{}-{}", std::process::id(), &nonce()[..8]);
    Ok(ReplicaIdentity { name, instance, url })
}

/// The body a master signs to ask another for a blob.
fn replica_body(sha: &Sha256) -> String {
    format!("REPLICA GET {sha}")
}

/// Masters have no MAC; their requests carry this one.
const NO_MAC: fleetboot_boot::MacAddr = fleetboot_boot::MacAddr([0; 6]);

/// Checks other masters' blob requests: signed with the fleet's master key, fresh, not
/// replayed.
pub struct ReplicaAuth {
    seen: Mutex<VecDeque<String>>,
}

const REPLICA_NONCES: usize = 4096;

impl ReplicaAuth {
    pub fn new() -> ReplicaAuth {
        ReplicaAuth { seen: Mutex::new(VecDeque::new()) }
    }

    pub fn check(&self, header: &str, sha: &Sha256, key: &KeyPair, max_skew_ms: u64, now_ms: u64) -> Result<(), &'static str> {
        let env = Envelope::from_header(header, replica_body(sha)).ok_or("X-Fleet-Replica: malformed")?;
        if !env.key.eq_ignore_ascii_case(&key.public_hex()) {
            return Err("not signed with this fleet's master key");
        }
        if !env.verifies() {
            return Err("the signature does not verify");
        }
        if env.ts_ms.abs_diff(now_ms) > max_skew_ms {
            return Err("the request's clock is too far off");
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&env.nonce) {
            return Err("replayed request");
        }
        if seen.len() >= REPLICA_NONCES {
            seen.pop_front();
        }
        seen.push_back(env.nonce);
        Ok(())
    }
}

impl Default for ReplicaAuth {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts the lease and replication tasks of a master.
pub fn spawn(svc: Arc<MasterService>) {
    tokio::spawn(lease_loop(svc.clone()));
    tokio::spawn(replication_loop(svc));
}

/// One look at the lease, and a claim if this master should make one. Returns whether
/// this master serves afterwards.
pub async fn lease_step(svc: &MasterService, first_seen_free: &mut Option<Instant>, last_renewed: &mut Instant) -> bool {
    let id = svc.identity();
    let ttl = svc.config().lease_ttl_ms;
    let claim = |may_take| MasterClaim { name: &id.name, instance: &id.instance, url: &id.url, ttl_ms: ttl, may_take };
    if svc.serving() {
        match svc.store().claim_master(claim(false)).await {
            Ok(lease) if lease.mine => {
                *last_renewed = Instant::now();
                svc.set_current_master(lease.holder.as_ref().map(|h| h.url.clone()));
            }
            Ok(lease) => {
                svc.set_current_master(lease.holder.as_ref().map(|h| h.url.clone()));
                svc.step_down("the lease was lost (another master holds it)");
            }
            Err(e) => {
                tracing::warn!(error = %e, "master: renewing the lease failed");
                if last_renewed.elapsed() >= Duration::from_millis(ttl) {
                    svc.step_down("the lease could not be renewed for a whole TTL");
                }
            }
        }
        return svc.serving();
    }
    let status = match svc.store().cluster_status_async().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "master: reading the lease failed");
            return false;
        }
    };
    let lease = status.lease;
    if lease.is_held() {
        *first_seen_free = None;
        svc.set_current_master(lease.holder.as_ref().map(|h| h.url.clone()));
        // Even if the row names this process (it stepped down when it could not renew),
        // it waits for the lease to lapse like everyone else.
        return false;
    }
    svc.set_current_master(None);
    let wait = svc.config().takeover_wait_ms(&id.name);
    let free_for = match &lease.holder {
        Some(h) if h.expires_ms > 0 => lease.now_ms.saturating_sub(h.expires_ms),
        // Never held, or released: counted from when this master first saw it free.
        _ => first_seen_free.get_or_insert_with(Instant::now).elapsed().as_millis() as u64,
    };
    if free_for < wait {
        return false;
    }
    match svc.store().claim_master(claim(true)).await {
        // `mine` without `taken`: the row still named this process (it stepped down when
        // it could not renew, and nobody took the lease meanwhile): its epoch is current.
        Ok(l) if l.mine => {
            *last_renewed = Instant::now();
            *first_seen_free = None;
            svc.set_current_master(Some(id.url.clone()));
            let previous = Previous::of(lease.holder.as_ref());
            let gap = lease.holder.as_ref().filter(|_| previous == Previous::Expired).map(|h| lease.now_ms.saturating_sub(h.expires_ms));
            tracing::warn!(epoch = l.epoch, previous = previous.as_str(), after_expiry_ms = ?gap, "master: took the master lease; this master now serves");
            if let Err(e) = svc.take_over(l.epoch, previous).await {
                tracing::error!(error = %format!("{e:#}"), "master: loading the databases after taking the lease failed; releasing it");
                let _ = svc.store().release_master(&id.instance).await;
            }
        }
        Ok(l) => svc.set_current_master(l.holder.as_ref().map(|h| h.url.clone())),
        Err(e) => tracing::warn!(error = %e, "master: claiming the lease failed"),
    }
    svc.serving()
}

/// How the lease this master took had been left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// Never held.
    Vacant,
    /// Its holder stopped cleanly and gave it up (`fleetboot master` on SIGTERM or
    /// SIGINT): the backups need not wait for it to lapse.
    Released,
    /// Its holder stopped renewing it (killed, hung, cut off from the store).
    Expired,
}

impl Previous {
    fn of(holder: Option<&fleetboot_store::cluster::MasterHolder>) -> Previous {
        match holder {
            None => Previous::Vacant,
            // A release zeroes the expiry; a lapsed lease keeps its last one.
            Some(h) if h.expires_ms == 0 => Previous::Released,
            Some(_) => Previous::Expired,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Previous::Vacant => "vacant",
            Previous::Released => "released",
            Previous::Expired => "expired",
        }
    }
}

async fn lease_loop(svc: Arc<MasterService>) {
    let ttl = svc.config().lease_ttl_ms;
    let mut first_seen_free = None;
    let mut last_renewed = Instant::now();
    loop {
        let serving = lease_step(&svc, &mut first_seen_free, &mut last_renewed).await;
        // The holder renews every third of the TTL; a backup looks often enough that its
        // rank's wait, not the polling, decides when it claims.
        let pause = if serving { ttl / 3 } else { (ttl / 12).clamp(100, 500) };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Every blob the loaded package database names, with its size.
fn wanted(svc: &MasterService) -> BTreeMap<Sha256, u64> {
    let m = svc.lock();
    m.db().all_packages().flat_map(|p| &p.builds).flat_map(|b| &b.files).map(|f| (f.sha256.clone(), f.size)).collect()
}

async fn replication_loop(svc: Arc<MasterService>) {
    let every = Duration::from_millis((svc.config().lease_ttl_ms / 3).max(500));
    let mut last_round = Instant::now() - every;
    let mut last_rev = u64::MAX;
    let mut key_checked: Option<String> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rev = svc.loaded_rev();
        // At once when the configuration moved (a new bundle names new blobs), and every
        // heartbeat anyway (a blob that failed, a master that came back).
        if rev == last_rev && last_round.elapsed() < every {
            continue;
        }
        last_rev = rev;
        last_round = Instant::now();
        let want = wanted(&svc);
        let missing: Vec<(Sha256, u64)> = want.iter().filter(|(sha, size)| !svc.blobs().has(sha, **size)).map(|(s, n)| (s.clone(), *n)).collect();
        report(&svc, rev, &want, &missing).await;
        let peers = peers(&svc).await;
        if !svc.serving() {
            check_master_key(&svc, peers.first(), &mut key_checked).await;
        }
        if missing.is_empty() || peers.is_empty() {
            continue;
        }
        let mut got = 0usize;
        for (sha, size) in &missing {
            for peer in &peers {
                match fetch_blob(&svc, peer, sha, *size).await {
                    Ok(()) => {
                        got += 1;
                        metrics::counter!("fleetboot_fleet_replica_blobs_total").increment(1);
                        metrics::counter!("fleetboot_fleet_replica_bytes_total").increment(*size);
                        break;
                    }
                    Err(e) => tracing::debug!(%sha, %peer, error = %format!("{e:#}"), "master: blob not fetched from this peer"),
                }
            }
        }
        if got > 0 {
            tracing::info!(blobs = got, missing = missing.len() - got, "master: copied blobs from the other masters");
            let missing: Vec<_> = missing.into_iter().filter(|(sha, size)| !svc.blobs().has(sha, *size)).collect();
            report(&svc, rev, &want, &missing).await;
        } else {
            tracing::warn!(missing = missing.len(), "master: blobs the package database names are missing here and no other master gave them");
        }
    }
}

/// The last report of a master stopping cleanly.
pub async fn report_stopped(svc: &MasterService) {
    let want = wanted(svc);
    let missing: Vec<(Sha256, u64)> = want.iter().filter(|(sha, size)| !svc.blobs().has(sha, **size)).map(|(s, n)| (s.clone(), *n)).collect();
    report_as(svc, "stopped", svc.loaded_rev(), &want, &missing).await;
}

async fn report(svc: &MasterService, rev: u64, want: &BTreeMap<Sha256, u64>, missing: &[(Sha256, u64)]) {
    report_as(svc, if svc.serving() { "master" } else { "backup" }, rev, want, missing).await;
}

async fn report_as(svc: &MasterService, role: &str, rev: u64, want: &BTreeMap<Sha256, u64>, missing: &[(Sha256, u64)]) {
    let id = svc.identity();
    let r = ReplicaReport {
        name: id.name.clone(),
        instance: id.instance.clone(),
        url: id.url.clone(),
        role: role.into(),
        loaded_rev: rev,
        blobs_wanted: want.len() as u64,
        blobs_missing: missing.len() as u64,
        bytes_missing: missing.iter().map(|(_, n)| n).sum(),
    };
    metrics::gauge!("fleetboot_fleet_replica_blobs_missing").set(missing.len() as f64);
    if let Err(e) = svc.store().report_replica(r).await {
        tracing::warn!(error = %e, "master: reporting to the store failed");
    }
}

/// The other masters to copy blobs from: the current master first, then the others
/// heard from recently.
async fn peers(svc: &MasterService) -> Vec<String> {
    let own = svc.identity().url.clone();
    let Ok(status) = svc.store().cluster_status_async().await else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(h) = status.lease.holder.as_ref().filter(|_| status.lease.is_held()) {
        out.push(h.url.clone());
    }
    let recent = 10 * svc.config().lease_ttl_ms;
    for r in &status.replicas {
        if status.lease.now_ms.saturating_sub(r.seen_ms) <= recent && !out.contains(&r.report.url) {
            out.push(r.report.url.clone());
        }
    }
    out.retain(|u| *u != own);
    out
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(300))).timeout_connect(Some(Duration::from_secs(3))).http_status_as_error(false).build().into()
}

/// A backup whose key is not the master's could not answer agents that pinned it.
async fn check_master_key(svc: &MasterService, master: Option<&String>, checked: &mut Option<String>) {
    let Some(url) = master.cloned() else { return };
    if checked.as_ref() == Some(&url) {
        return;
    }
    let got = tokio::task::spawn_blocking({
        let url = url.clone();
        move || -> Result<String> {
            let mut r = http().get(format!("{url}/fleet/v1/master-key")).call()?;
            Ok(r.body_mut().with_config().limit(1024).read_to_string()?.trim().to_string())
        }
    })
    .await;
    if let Ok(Ok(theirs)) = got {
        if theirs.eq_ignore_ascii_case(&svc.public_key()) {
            tracing::info!(master = %url, "master: the current master signs with the same key as this backup");
        } else {
            tracing::error!(master = %url, theirs = %theirs, ours = %svc.public_key(),
                "master: this backup's key is not the current master's; agents that pinned the master's key would refuse it (copy the fleet's master key to fleet.key_file on every master)");
        }
        *checked = Some(url);
    }
}

/// Copies one blob from a peer into the blob directory, verified by its hash.
async fn fetch_blob(svc: &MasterService, peer: &str, sha: &Sha256, size: u64) -> Result<()> {
    let env = Envelope::sign(svc.key(), NO_MAC, super::db::now_ms(), nonce(), replica_body(sha));
    let (url, header, blobs, sha) = (format!("{peer}/fleet/v1/replica/blobs/{sha}"), env.to_header(), svc.blobs().clone(), sha.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut resp = http().get(&url).header("x-fleet-replica", header).call()?;
        if resp.status() != 200 {
            let text = resp.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
            bail!("HTTP {}: {}", resp.status(), text.trim());
        }
        let mut body = resp.body_mut().with_config().limit(size + 1).reader();
        let staged = blobs.stage(&mut body, size).context("copying")?;
        blobs.commit(staged, &sha).context("checking")?;
        Ok(())
    })
    .await
    .context("the copying task failed")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fresh_request_signed_with_the_fleets_key_may_copy_a_blob() {
        let fleet = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let auth = ReplicaAuth::new();
        let sha = Sha256::of(b"blob");
        let now = 1_000_000;
        let signed = |k: &KeyPair, ts, body: String| Envelope::sign(k, NO_MAC, ts, nonce(), body).to_header();
        let good = signed(&fleet, now, replica_body(&sha));
        assert_eq!(auth.check(&good, &sha, &fleet, 300_000, now), Ok(()));
        assert_eq!(auth.check(&good, &sha, &fleet, 300_000, now), Err("replayed request"));
        let foreign = signed(&other, now, replica_body(&sha));
        assert_eq!(auth.check(&foreign, &sha, &fleet, 300_000, now), Err("not signed with this fleet's master key"));
        let other_blob = signed(&fleet, now, replica_body(&Sha256::of(b"another")));
        assert_eq!(auth.check(&other_blob, &sha, &fleet, 300_000, now), Err("the signature does not verify"));
        let old = signed(&fleet, now - 400_000, replica_body(&sha));
        assert_eq!(auth.check(&old, &sha, &fleet, 300_000, now), Err("the request's clock is too far off"));
        assert!(auth.check("garbage", &sha, &fleet, 300_000, now).is_err());
    }

    #[test]
    fn the_url_comes_from_the_config_else_the_listen_address() {
        let mut c = FleetConfig { name: Some("m2".into()), ..FleetConfig::default() };
        let id = identity(&c, Some("127.0.0.1:8090".parse().unwrap())).unwrap();
        assert_eq!((id.name.as_str(), id.url.as_str()), ("m2", "http://127.0.0.1:8090"));
        assert!(id.instance.starts_with("m2-"));
        assert_ne!(identity(&c, None).unwrap().instance, id.instance, "every process is a new holder");
        c.url = Some("http://m2.example:8090".into());
        assert_eq!(identity(&c, Some("0.0.0.0:1".parse().unwrap())).unwrap().url, "http://m2.example:8090");
    }
}

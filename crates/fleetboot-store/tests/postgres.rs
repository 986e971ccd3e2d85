//! The PostgreSQL store against a real PostgreSQL: a private cluster per test (initdb in
//! a temporary directory, its own socket and port, removed at the end). Skipped with the
//! reason when PostgreSQL is not installed, a failure under FLEETBOOT_REQUIRE_E2E=1.

use fleetboot_store::cluster::MasterClaim;
use fleetboot_store::config::{RawStore, StoreConfig};
use fleetboot_store::fleet::FleetWrite;
use fleetboot_store::testing::{self, PgCluster};
use fleetboot_store::{AuditEntry, LeaseCommit, LeaseRecord, Store, StoreError, StoredProfile, TokenRecord, TraceEvent, Write};
use std::path::Path;

fn pg_config(url: &str, migrate: &str) -> StoreConfig {
    let raw: RawStore = toml::from_str(&format!("url = {url:?}\nmigrate = {migrate:?}")).unwrap();
    raw.validate(Path::new("/")).unwrap()
}

fn lease(ip: &str, mac: &str) -> LeaseRecord {
    LeaseRecord {
        ip: ip.parse().unwrap(),
        mac: mac.into(),
        client_id: Some(vec![1, 0xaa, 0xff]),
        expires_at: 4_000_000_000,
        hostname: Some("n1".into()),
        state: "bound".into(),
    }
}

/// The writes a serving fleetboot makes, in one batch per job.
fn sample_writes() -> Vec<Vec<Write>> {
    vec![
        vec![Write::UpsertLease(lease("10.0.0.5", "52:54:00:00:00:01")), Write::UpsertLease(lease("10.0.0.6", "52:54:00:00:00:02"))],
        vec![Write::RemoveLease("10.0.0.6".parse().unwrap())],
        vec![Write::UpsertProfile(StoredProfile { name: "linux".into(), json: "{\"k\":1}".into(), source: "config".into() })],
        (0..5)
            .map(|i| Write::Trace(TraceEvent { ts_ms: 1000 + i, mac: "52:54:00:00:00:01".into(), kind: "DHCPDISCOVER".into(), detail: format!("#{i}") }))
            .collect(),
        vec![Write::Fleet { fence: None, write: FleetWrite::PutNode { name: "n1".into(), mac: "52:54:00:00:00:01".into(), json: "{}".into() } }],
        vec![Write::InsertToken(token("ci", "aa")), Write::InsertToken(token("ops", "bb"))],
        // A live token of the same name: a no-op, not a failed batch.
        vec![Write::InsertToken(token("ci", "cc"))],
        vec![Write::RevokeToken { id: 1, at_ms: 9 }, Write::InsertToken(token("ci", "dd"))],
        (0..3)
            .map(|i| {
                Write::Audit(AuditEntry {
                    id: 0,
                    ts_ms: 100 + i,
                    actor: "ci".into(),
                    actor_id: Some(1),
                    action: "profile.create".into(),
                    target: format!("profile/p{i}"),
                    before: None,
                    after: Some("{}".into()),
                    remote: Some("127.0.0.1".into()),
                })
            })
            .collect(),
    ]
}

fn token(name: &str, sha256: &str) -> TokenRecord {
    TokenRecord { id: 0, name: name.into(), role: "admin".into(), sha256: sha256.into(), created_ms: 5, revoked_ms: None }
}

/// Everything the sample writes can be read back as, in one comparable value.
fn snapshot(s: &Store) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        s.lease("10.0.0.5".parse().unwrap()).unwrap(),
        s.tokens().unwrap(),
        s.live_tokens().unwrap(),
        s.token_by_sha256("bb").unwrap(),
        s.audit(Some(1), 10).unwrap(),
        s.leases().unwrap(),
        s.profiles().unwrap(),
        s.trace("52:54:00:00:00:01", 3).unwrap(),
        s.fleet_config().unwrap().nodes,
        s.fleet_meta().unwrap().config_rev,
    )
}

#[test]
fn migrate_check_and_the_same_rows_as_sqlite() {
    if !testing::ready("migrate_check_and_the_same_rows_as_sqlite") {
        return;
    }
    let pg = PgCluster::start(Default::default()).unwrap();
    let tmp = tempdir();
    let sqlite = tmp.join("fleetboot.db");

    // A fresh database: version 0; a manual-migration server refuses to start on it.
    let manual = pg_config(&pg.url(), "manual");
    let v = Store::schema_version(&manual, &sqlite).unwrap();
    assert_eq!(v.current, 0);
    assert!(v.latest >= 3, "{v:?}");
    match Store::open_with(&manual, &sqlite) {
        Err(StoreError::SchemaBehind { current: 0, latest }) => assert_eq!(latest, v.latest),
        Err(e) => panic!("expected SchemaBehind, got {e}"),
        Ok(_) => panic!("a manual store opened with its schema behind"),
    }
    // `fleetboot store migrate`: every step once; a second run has nothing to do.
    assert_eq!(Store::migrate(&manual, &sqlite).unwrap(), (0, v.latest));
    assert_eq!(Store::migrate(&manual, &sqlite).unwrap(), (v.latest, v.latest));
    assert_eq!(Store::schema_version(&manual, &sqlite).unwrap().current, v.latest);

    // The same writes through both backends read back the same.
    let on_pg = Store::open_with(&manual, &sqlite).unwrap();
    assert!(on_pg.is_shared());
    let on_sqlite = Store::open_with(&StoreConfig::default(), &sqlite).unwrap();
    assert!(!on_sqlite.is_shared());
    for job in sample_writes() {
        on_pg.write_blocking(job.clone()).unwrap();
        on_sqlite.write_blocking(job).unwrap();
    }
    let (a, b) = (snapshot(&on_pg), snapshot(&on_sqlite));
    assert_eq!(a, b);
    assert!(a.contains("10.0.0.5") && !a.contains("10.0.0.6") && a.contains("#4") && !a.contains("#1"), "{a}");
    assert!(a.contains("revoked_ms: Some(9)") && a.contains("\"dd\"") && !a.contains("\"cc\"") && a.contains("profile/p2"), "{a}");

    // Another server opening the migrated store (auto) changes nothing and sees the rows.
    let auto = pg_config(&pg.url(), "auto");
    let again = Store::open_with(&auto, &sqlite).unwrap();
    assert_eq!(snapshot(&again), a);
}

#[test]
fn a_deposed_master_cannot_write_on_either_backend() {
    if !testing::ready("a_deposed_master_cannot_write_on_either_backend") {
        return;
    }
    let pg = PgCluster::start(Default::default()).unwrap();
    let tmp = tempdir();
    let sqlite = tmp.join("fleetboot.db");
    let stores = [
        ("postgresql", Store::open_with(&pg_config(&pg.url(), "auto"), &sqlite).unwrap()),
        ("sqlite", Store::open_with(&StoreConfig::default(), &tmp.join("own.db")).unwrap()),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (backend, store) in stores {
        rt.block_on(deposed_master(backend, store));
    }
}

async fn deposed_master(backend: &str, store: Store) {
    let claim = |instance: &'static str, ttl_ms: u64| MasterClaim { name: instance, instance, url: "http://10.0.0.1:8090", ttl_ms, may_take: true };
    let state = |json: &str| FleetWrite::PutNodeState { name: "n1".into(), json: json.into() };

    let a = store.claim_master(claim("master-a", 60_000)).await.unwrap();
    assert!(a.mine && a.taken, "{backend}: {a:?}");
    // While A's lease runs, B may not take it.
    let b = store.claim_master(claim("master-b", 60_000)).await.unwrap();
    assert!(!b.mine && !b.taken && b.epoch == a.epoch, "{backend}: {b:?}");
    store.write(vec![Write::Fleet { fence: Some(a.epoch), write: state("from a") }]).await.unwrap();

    // A stops renewing (it hangs): its last renewal runs out, B takes the next epoch.
    let renewed = store.claim_master(claim("master-a", 1)).await.unwrap();
    assert!(renewed.mine && !renewed.taken, "{backend}: {renewed:?}");
    let mut b = store.claim_master(claim("master-b", 60_000)).await.unwrap();
    for _ in 0..200 {
        if b.taken {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        b = store.claim_master(claim("master-b", 60_000)).await.unwrap();
    }
    assert!(b.mine && b.taken && b.epoch == a.epoch + 1, "{backend}: {b:?}");

    // A wakes up: every write it fences with its epoch is refused, and it cannot renew.
    match store.write(vec![Write::Fleet { fence: Some(a.epoch), write: state("late from a") }]).await {
        Err(StoreError::StaleEpoch { held, current }) => assert_eq!((held, current), (a.epoch, b.epoch), "{backend}"),
        other => panic!("{backend}: a deposed master's write gave {other:?}"),
    }
    let late = store.claim_master(claim("master-a", 60_000)).await.unwrap();
    assert!(!late.mine && late.holder.as_ref().is_some_and(|h| h.instance == "master-b"), "{backend}: {late:?}");
    store.write(vec![Write::Fleet { fence: Some(b.epoch), write: state("from b") }]).await.unwrap();
    assert_eq!(store.fleet_node_state("n1").unwrap().as_deref(), Some("from b"), "{backend}");

    let status = store.cluster_status_async().await.unwrap();
    assert_eq!(status.lease.epoch, b.epoch, "{backend}");
    assert_eq!(status.lease.holder.map(|h| h.instance).as_deref(), Some("master-b"), "{backend}");
}

#[test]
fn two_servers_never_bind_one_address_to_two_clients() {
    if !testing::ready("two_servers_never_bind_one_address_to_two_clients") {
        return;
    }
    let pg = PgCluster::start(Default::default()).unwrap();
    let tmp = tempdir();
    let cfg = pg_config(&pg.url(), "auto");
    let server_a = Store::open_with(&cfg, &tmp.join("a.db")).unwrap();
    let server_b = Store::open_with(&cfg, &tmp.join("b.db")).unwrap();
    let mut heard_by_b = server_b.subscribe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let now = 1_000;
        // Two clients: different MACs and client identifiers.
        let bind = |mac: &str| LeaseCommit {
            binds: vec![LeaseRecord { client_id: Some(mac.as_bytes().to_vec()), ..lease("10.0.0.9", mac) }],
            removes: vec![],
            now,
        };
        server_a.commit_leases(bind("52:54:00:00:00:0a")).await.unwrap();
        match server_b.commit_leases(bind("52:54:00:00:00:0b")).await {
            Err(StoreError::LeaseConflict { ip, current }) => {
                assert_eq!(ip.to_string(), "10.0.0.9");
                assert_eq!(current.map(|l| l.mac).as_deref(), Some("52:54:00:00:00:0a"));
            }
            other => panic!("a second client's bind of a held address gave {other:?}"),
        }
        let leases = server_b.leases_async().await.unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].mac, "52:54:00:00:00:0a");
        // B hears of A's lease from the database as it commits (LISTEN/NOTIFY).
        let notice = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let n = heard_by_b.recv().await.unwrap();
                if n.kind == fleetboot_store::NoticeKind::Leases && Some(n.origin.as_str()) != server_b.notice_origin() {
                    return n;
                }
            }
        })
        .await
        .expect("server B heard no lease notice");
        let heard = fleetboot_store::parse_notices(&notice.body);
        assert!(heard.iter().any(|l| l.ip.to_string() == "10.0.0.9" && l.mac == "52:54:00:00:00:0a"), "{notice:?}");
    });
}

#[test]
fn writes_resume_after_postgresql_restarts() {
    if !testing::ready("writes_resume_after_postgresql_restarts") {
        return;
    }
    let mut pg = PgCluster::start(Default::default()).unwrap();
    let tmp = tempdir();
    let store = Store::open_with(&pg_config(&pg.url(), "auto"), &tmp.join("x.db")).unwrap();
    store.write_blocking(vec![Write::UpsertLease(lease("10.0.0.20", "52:54:00:00:00:20"))]).unwrap();
    pg.stop("immediate").unwrap();
    // Down: a write is reported failed, never reported done.
    assert!(store.write_blocking(vec![Write::UpsertLease(lease("10.0.0.21", "52:54:00:00:00:21"))]).is_err());
    pg.start_again().unwrap();
    // Up again: the pool replaces its dead connections; a bounded number of tries (a
    // loaded machine can take seconds to accept connections again).
    let mut result = Err(StoreError::WriterGone);
    for _ in 0..150 {
        result = store.write_blocking(vec![Write::UpsertLease(lease("10.0.0.22", "52:54:00:00:00:22"))]);
        if result.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    result.unwrap();
    let ips: Vec<String> = store.leases().unwrap().iter().map(|l| l.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.20", "10.0.0.22"], "the committed lease survived the crash, the failed one is absent");
    let _ = pg.log();
}

/// A temporary directory removed when the test's process ends.
fn tempdir() -> TempDir {
    let d = std::env::temp_dir().join(format!("fleetboot-store-test-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn join(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}


//! Backup masters, end to end on loopback: three `fleetboot master` processes on one
//! store — a private PostgreSQL cluster, or one SQLite file (each master's
//! `data_dir/fleetboot.db` a link to it: one host) — each with its own data directory and
//! blobs, sharing the fleet's master key; real `fleetboot agent node` processes given all
//! three URLs.
//!
//! The master is SIGKILLed in the middle of a `fleetboot fleet prepare` campaign: the
//! designated backup takes the lease (next epoch), then it is killed too and the last,
//! undesignated one takes it; every node still ends stored and validated. The first master,
//! restarted, comes back as a backup, and the store refuses a write fenced with its old
//! epoch. Assertions are on the lease (holder, epoch), the campaign's states, bytes and
//! counts of blobs — the takeover times are printed, not asserted.

mod fleet_common;

use fleet_common::{cli, free_port, ok, EXE};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TTL_MS: u64 = 6000;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct MasterHost {
    name: &'static str,
    dir: PathBuf,
    config: PathBuf,
    url: String,
}

impl MasterHost {
    fn cfg(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn start(&self, run: usize) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!("master-{run}.log"))).unwrap();
        let child = Command::new(EXE).args(["master", "--config", self.cfg()]).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Proc(child)
    }

    fn log(&self) -> String {
        let mut s = String::new();
        for run in 1..=2 {
            if let Ok(t) = std::fs::read_to_string(self.dir.join(format!("master-{run}.log"))) {
                s.push_str(&format!("--- {} run {run} ---\n{}", self.name, last_lines(&t, 40)));
            }
        }
        s
    }
}

/// The last `n` lines of a log.
fn last_lines(t: &str, n: usize) -> String {
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn status(cfg: &str) -> Value {
    serde_json::from_str(&ok(&["master", "status", "-c", cfg, "--json"])).unwrap()
}

fn wait_for(what: &str, timeout: Duration, logs: &dyn Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn replica<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["replicas"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or(&Value::Null)
}

const BUNDLE: &str = r#"format = 1
[[image]]
name = "lc-boot"
version = "1.0"
node_types = ["linecard"]
[[image.build]]
arch = "x86_64"
files = [{ path = "vmlinuz", source = "vmlinuz" }]
[[package]]
name = "base"
version = "1.0"
[[package.build]]
arch = "noarch"
files = [{ path = "run", source = "base.run" }, { path = "data", source = "base.data" }]
[[package]]
name = "routing"
version = "1.0"
depends = [{ name = "base" }]
[[package.build]]
arch = "noarch"
files = [{ path = "run", source = "routing.run" }]
[[class]]
name = "linecards"
packages = { routing = "latest" }
"#;

fn bundle(root: &Path, nodes: usize) -> PathBuf {
    let src = root.join("bundle");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("vmlinuz"), "lab kernel 1.0").unwrap();
    std::fs::write(src.join("base.run"), "#!/bin/sh\necho PKG base\n").unwrap();
    // Big enough that a download is still going when a master is killed, some of the time.
    std::fs::write(src.join("base.data"), vec![b'x'; 4 << 20]).unwrap();
    std::fs::write(src.join("routing.run"), "#!/bin/sh\necho PKG routing\n").unwrap();
    let mut toml = BUNDLE.to_string();
    for i in 1..=nodes {
        toml.push_str(&format!(
            "[[node]]\nname = \"lc{i}\"\nmac = \"52:54:00:77:00:{i:02x}\"\ntype = \"linecard\"\narch = \"x86_64\"\nclass = \"linecards\"\n"
        ));
    }
    std::fs::write(src.join("bundle.toml"), toml).unwrap();
    let out = root.join("release.fbundle");
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    out
}

fn agent_args(root: &Path, i: usize, masters: &str, boots: usize) -> Vec<String> {
    let mut a: Vec<String> = ["agent", "node", "--master", masters, "--type", "linecard", "--arch", "x86_64", "--json"].iter().map(|s| s.to_string()).collect();
    a.extend(["--mac".into(), format!("52:54:00:77:00:{i:02x}")]);
    a.extend(["--storage".into(), root.join(format!("node{i}")).display().to_string(), "--boots".into(), boots.to_string()]);
    a
}

fn boot(root: &Path, i: usize, masters: &str, boots: usize) -> Vec<Value> {
    let out = Command::new(EXE).args(agent_args(root, i, masters, boots)).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "agent {i} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn campaign(cfg: &str) -> Option<Value> {
    let (ok_, out, _) = cli(&["fleet", "status", "-c", cfg, "--json"]);
    if !ok_ {
        return None;
    }
    serde_json::from_str::<Value>(&out).ok()?.as_array()?.last().cloned()
}

enum StoreKind {
    Postgres(fleetboot_store::testing::PgCluster),
    /// The one database file the masters' data directories link to.
    Sqlite(PathBuf),
}

#[test]
fn backups_take_over_a_prepare_campaign_on_postgresql() {
    if !fleetboot_store::testing::ready("backups_take_over_a_prepare_campaign_on_postgresql") {
        return;
    }
    let pg = fleetboot_store::testing::PgCluster::start(Default::default()).unwrap();
    scenario(StoreKind::Postgres(pg), tempfile::tempdir().unwrap());
}

#[test]
fn backups_take_over_a_prepare_campaign_on_one_sqlite_file() {
    let root = tempfile::tempdir().unwrap();
    let db = root.path().join("shared/fleetboot.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    scenario(StoreKind::Sqlite(db), root);
}

/// The designated order, then election, during a campaign; see the top of the file.
fn scenario(store_kind: StoreKind, root: tempfile::TempDir) {
    let root = root.path();
    // The fleet's master key, copied (0600) to every master.
    let key = root.join("fleet-master.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key).unwrap();
        std::io::Write::write_all(&mut f, "42".repeat(32).as_bytes()).unwrap();
    }
    let hosts: Vec<MasterHost> = ["m1", "m2", "m3"]
        .iter()
        .map(|name| {
            let dir = root.join(name);
            std::fs::create_dir_all(dir.join("state")).unwrap();
            let store_toml = match &store_kind {
                StoreKind::Postgres(pg) => format!("[store]\nurl = {:?}\n", pg.url()),
                StoreKind::Sqlite(db) => {
                    std::os::unix::fs::symlink(db, dir.join("state/fleetboot.db")).unwrap();
                    String::new()
                }
            };
            // Each master's operator API on a port of its own (three share this host).
            let (port, admin_port) = (free_port(), free_port());
            let config = dir.join("fleetboot.toml");
            std::fs::write(
                &config,
                format!(
                    "data_dir = \"state\"\n[server]\naddress = \"127.0.0.1\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
                     {store_toml}\
                     [fleet]\nlisten = \"127.0.0.1:{port}\"\nheartbeat_s = 1\nname = \"{name}\"\nlease_ttl_ms = {TTL_MS}\n\
                     backup_order = [\"m1\", \"m2\"]\nkey_file = {:?}\n",
                    key.display().to_string()
                ),
            )
            .unwrap();
            MasterHost { name, dir, config, url: format!("http://127.0.0.1:{port}") }
        })
        .collect();
    let nodes = 3;
    // The masters' logs, then the staying agents' (what each boot did, and every master it
    // could not reach).
    let logs = || {
        let mut all: Vec<String> = hosts.iter().map(MasterHost::log).collect();
        for i in 1..=nodes {
            if let Ok(t) = std::fs::read_to_string(root.join(format!("agent-{i}.log"))) {
                all.push(format!("--- agent lc{i} ---\n{}", last_lines(&t, 40)));
            }
        }
        all.join("\n")
    };
    let cfg = hosts[0].cfg().to_string();
    let all_urls = hosts.iter().map(|h| h.url.as_str()).collect::<Vec<_>>().join(",");

    // m1 first: it takes the free lease at once; then the two backups.
    let mut procs: Vec<Option<Proc>> = vec![Some(hosts[0].start(1)), None, None];
    wait_for("m1 to hold the lease", Duration::from_secs(60), &logs, || status(&cfg)["master"]["name"] == "m1");
    let epoch1 = status(&cfg)["epoch"].as_u64().unwrap();
    procs[1] = Some(hosts[1].start(1));
    procs[2] = Some(hosts[2].start(1));

    // The release goes into m1's blob directory only; the backups copy it from m1.
    let b = bundle(root, nodes);
    ok(&["bundle", "import", b.to_str().unwrap(), "-c", &cfg]);
    wait_for("the backups to copy every blob", Duration::from_secs(60), &logs, || {
        let s = status(&cfg);
        ["m1", "m2", "m3"].iter().all(|n| {
            let r = replica(&s, n);
            r["blobs_wanted"] == 4 && r["blobs_missing"] == 0 && r["revisions_behind"] == 0
        })
    });
    let s = status(&cfg);
    assert_eq!((replica(&s, "m2")["role"].as_str(), replica(&s, "m3")["role"].as_str()), (Some("backup"), Some("backup")), "{s}");
    for h in &hosts[1..] {
        let copied = std::fs::read_dir(h.dir.join("state/fleet/blobs/sha256")).unwrap().count();
        assert_eq!(copied, 4, "{}: its own copy of every blob", h.name);
    }

    // A backup turns agents away to the master: an agent given only m2's URL is served.
    let first = boot(root, 1, &hosts[1].url, 2);
    assert_eq!(first.iter().map(|b| b["summary"]["verdict"].as_str().unwrap()).collect::<Vec<_>>(), ["install", "match"]);
    for i in 2..=nodes {
        boot(root, i, &all_urls, 2);
    }

    // Agents that stay and obey the campaign, each knowing all three masters.
    let _agents: Vec<Proc> = (1..=nodes)
        .map(|i| {
            let mut a = agent_args(root, i, &all_urls, 12);
            a.extend(["--stay".into(), "--heartbeat".into(), "1".into()]);
            let log = std::fs::File::create(root.join(format!("agent-{i}.log"))).unwrap();
            Proc(Command::new(EXE).args(a).env("RUST_LOG", "info").stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap())
        })
        .collect();
    let prepare = Command::new(EXE)
        .args(["fleet", "prepare", "--class", "linecards", "--deadline", "90", "-c", &cfg, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Kill m1 as soon as the campaign has started resetting nodes.
    let mut at_kill = Value::Null;
    wait_for("the campaign to start", Duration::from_secs(60), &logs, || {
        at_kill = campaign(&cfg).unwrap_or(Value::Null);
        at_kill["stage"] == "preparing" && at_kill["nodes"].as_object().is_some_and(|n| n.values().any(|s| s != "reset_ordered"))
    });
    procs[0] = None; // SIGKILL
    let killed = Instant::now();
    let mut s = Value::Null;
    wait_for("m2 to take over", Duration::from_secs(60), &logs, || {
        s = status(&cfg);
        s["master"]["name"] != "m1" && !s["master"].is_null()
    });
    let takeover_1 = killed.elapsed();
    assert_eq!(s["master"]["name"], "m2", "the designated backup took over: {s}");
    assert_eq!(s["epoch"].as_u64(), Some(epoch1 + 1), "{s}");
    let m2_since = s["master"]["since_ms"].as_u64().unwrap();
    // m2 serves part of the campaign (its epoch is on what it records) before it dies.
    wait_for("m2 to serve a node", Duration::from_secs(60), &logs, || {
        let v: Value = serde_json::from_str(&ok(&["fleet", "verifications", "--limit", "1000", "-c", &cfg, "--json"])).unwrap();
        v.as_array().unwrap().iter().any(|r| r["epoch"] == epoch1 + 1)
    });
    let stage_at_second_kill = campaign(&cfg).map(|c| c["stage"].clone()).unwrap_or_default();

    // Then m2 dies too: m3, not designated, takes the lease once it is free.
    procs[1] = None;
    let killed = Instant::now();
    wait_for("m3 to take over", Duration::from_secs(60), &logs, || {
        s = status(&cfg);
        s["master"]["name"] == "m3"
    });
    let takeover_2 = killed.elapsed();
    assert_eq!(s["epoch"].as_u64(), Some(epoch1 + 2), "{s}");

    // The campaign ends with every node stored, then validated by its warm boot.
    let out = prepare.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr), logs());
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["stage"], "done", "{done}");
    for i in 1..=nodes {
        assert_eq!(done["nodes"][format!("lc{i}")], "validated", "{done}\n{}", logs());
        let installed: Value = serde_json::from_slice(&std::fs::read(root.join(format!("node{i}/installed.json"))).unwrap()).unwrap();
        assert_eq!(installed.as_array().unwrap().len(), 3, "lc{i}: image, base, routing stored");
    }
    let nodes_json: Value = serde_json::from_str(&ok(&["node", "list", "-c", &cfg, "--json"])).unwrap();
    for n in nodes_json.as_array().unwrap() {
        assert_eq!(n["state"]["installed"].as_array().map(Vec::len), Some(3), "{n}");
    }

    // m1 comes back: as a backup (the lease is m3's), and nothing it could write with its
    // old epoch is accepted.
    procs[0] = Some(hosts[0].start(2));
    wait_for("m1 to report as a backup", Duration::from_secs(60), &logs, || {
        let s = status(&cfg);
        let r = replica(&s, "m1");
        r["role"] == "backup" && r["stale"] == false && r["blobs_missing"] == 0
    });
    let s = status(&cfg);
    assert_eq!((s["master"]["name"].as_str(), s["epoch"].as_u64()), (Some("m3"), Some(epoch1 + 2)), "{s}");
    let boots = boot(root, 1, &hosts[0].url, 1);
    assert_eq!(boots[0]["summary"]["verdict"], "match", "the restarted m1 sends the agent to m3");

    let store = match &store_kind {
        StoreKind::Postgres(pg) => fleetboot_store::Store::open_with(
            &fleetboot_store::config::StoreConfig { backend: fleetboot_store::config::Backend::Postgres(pg_config(pg)), migrate: fleetboot_store::config::Migrate::Auto, ..Default::default() },
            &root.join("unused.db"),
        )
        .unwrap(),
        StoreKind::Sqlite(db) => fleetboot_store::Store::open(db).unwrap(),
    };
    let fenced = |epoch| {
        vec![fleetboot_store::Write::Fleet { fence: Some(epoch), write: fleetboot_store::fleet::FleetWrite::TrimVerifications { keep: 1 } }]
    };
    match store.write_blocking(fenced(epoch1)) {
        Err(fleetboot_store::StoreError::StaleEpoch { held, current }) => assert_eq!((held, current), (epoch1, epoch1 + 2)),
        other => panic!("a write fenced with m1's old epoch: {other:?}"),
    }
    let verifications: Value = serde_json::from_str(&ok(&["fleet", "verifications", "--limit", "1000", "-c", &cfg, "--json"])).unwrap();
    let late_old: Vec<_> = verifications.as_array().unwrap().iter().filter(|v| v["epoch"] == epoch1 && v["ts_ms"].as_u64().unwrap() >= m2_since).collect();
    assert!(late_old.is_empty(), "writes of m1's epoch after m2 took over: {late_old:?}");
    let by_epoch = |e: u64| verifications.as_array().unwrap().iter().filter(|v| v["epoch"] == e).count();
    eprintln!(
        "{}: takeover after SIGKILL: m1 -> m2 {:.1} s, m2 -> m3 {:.1} s (lease TTL {} s); campaign at the first kill: {}; stage at the second: {}; verifications per epoch: {} / {} / {}",
        if matches!(store_kind, StoreKind::Postgres(_)) { "postgresql" } else { "sqlite" },
        takeover_1.as_secs_f64(),
        takeover_2.as_secs_f64(),
        TTL_MS / 1000,
        at_kill["nodes"],
        stage_at_second_kill,
        by_epoch(epoch1),
        by_epoch(epoch1 + 1),
        by_epoch(epoch1 + 2)
    );
    assert!(by_epoch(epoch1 + 1) > 0 && by_epoch(epoch1 + 2) > 0, "m2 and then m3 served part of the campaign");

    // A clean stop hands over: m3 stopped with SIGTERM releases the lease, and m1 (first
    // in the designated order, m2 being dead) takes a released lease, not an expired one.
    let m3 = procs[2].take().unwrap();
    let stopped = Instant::now();
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(m3.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let mut m3 = m3;
    let exit = m3.0.wait().unwrap();
    assert!(exit.success(), "m3 stops cleanly on SIGTERM: {exit}\n{}", logs());
    wait_for("m1 to take over from m3", Duration::from_secs(60), &logs, || status(&cfg)["master"]["name"] == "m1");
    let handover = stopped.elapsed();
    let s = status(&cfg);
    assert_eq!(s["epoch"].as_u64(), Some(epoch1 + 3), "{s}");
    let read_log = |h: &MasterHost, run: usize| std::fs::read_to_string(h.dir.join(format!("master-{run}.log"))).unwrap_or_default();
    assert_eq!(read_log(&hosts[2], 1).matches("the lease is released").count(), 1, "m3 says it released the lease\n{}", logs());
    let killed_then_taken: Vec<String> = read_log(&hosts[1], 1).lines().filter(|l| l.contains("took the master lease")).map(str::to_string).collect();
    assert!(killed_then_taken.len() == 1 && killed_then_taken[0].contains("expired"), "m2 waited for the SIGKILLed m1's lease to lapse: {killed_then_taken:?}");
    let takeovers: Vec<String> = read_log(&hosts[0], 2).lines().filter(|l| l.contains("took the master lease")).map(str::to_string).collect();
    assert_eq!(takeovers.len(), 1, "the restarted m1 took the lease once: {takeovers:?}");
    assert!(takeovers[0].contains("released") && !takeovers[0].contains("expired"), "m1 took a released lease, without waiting for it to lapse: {takeovers:?}");
    eprintln!("handover after SIGTERM: m3 -> m1 {:.1} s (lease TTL {} s)", handover.as_secs_f64(), TTL_MS / 1000);
}

fn pg_config(pg: &fleetboot_store::testing::PgCluster) -> fleetboot_store::config::PgConfig {
    fleetboot_store::config::PgConfig { url: pg.url(), password_file: None, ca_file: None, pool_size: 2, connect_timeout: Duration::from_secs(10) }
}

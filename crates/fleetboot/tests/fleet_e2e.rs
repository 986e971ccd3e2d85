//! The provisioning master and node agents, end to end on loopback: `fleetboot master`,
//! `fleetboot bundle build|import`, `fleetboot node|class|package|fleet` and real `fleetboot
//! agent node` processes with their own local storage. Assertions are counts — bytes the
//! master served per node, verdicts, campaign states — never times.

mod fleet_common;

use fleet_common::{cli, free_port, ok, EXE};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};


struct Master {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The agents' listener.
    url: String,
    /// The operators' listener (`[admin]`).
    admin: String,
    child: Child,
}

/// Operator routes (`/api/...`) are on the admin listener, the agents' on theirs.
fn url_of(m: &Master, path: &str) -> String {
    let base = if path.starts_with("/api/") { &m.admin } else { &m.url };
    format!("{base}{path}")
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_script(name: &str, version: &str) -> String {
    format!("#!/bin/sh\necho \"PKG {name} {version}\"\n")
}

/// A bundle source directory: an image, packages with `run` scripts printing a marker.
fn bundle_dir(root: &Path, name: &str, packages: &[(&str, &str, &str, &str)], extra_toml: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vmlinuz"), "lab kernel 1.0").unwrap();
    let mut toml = String::from(
        "format = 1\n[[image]]\nname = \"lc-boot\"\nversion = \"1.0\"\nnode_types = [\"linecard\"]\n[[image.build]]\narch = \"x86_64\"\nfiles = [{ path = \"vmlinuz\", source = \"vmlinuz\" }]\n",
    );
    for (pkg, version, deps, provides) in packages {
        let file = format!("{pkg}-{version}.run");
        std::fs::write(dir.join(&file), run_script(pkg, version)).unwrap();
        toml.push_str(&format!(
            "[[package]]\nname = \"{pkg}\"\nversion = \"{version}\"\ndepends = [{deps}]\nprovides = [{provides}]\n[[package.build]]\narch = \"noarch\"\nfiles = [{{ path = \"run\", source = \"{file}\" }}]\n"
        ));
    }
    toml.push_str(extra_toml);
    std::fs::write(dir.join("bundle.toml"), toml).unwrap();
    dir
}

fn start_master() -> Master {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let config = dir.path().join("fleetboot.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"state\"\n[server]\naddress = \"127.0.0.1\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[fleet]\nlisten = \"127.0.0.1:{port}\"\nheartbeat_s = 1\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("master.log")).unwrap();
    let child = Command::new(EXE).args(["master", "--config"]).arg(&config).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let m = Master { dir, config, url, admin: format!("http://127.0.0.1:{admin_port}"), child };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&m, "/fleet/v1/master-key").is_none() {
        assert!(Instant::now() < deadline, "the master did not start: {}", std::fs::read_to_string(m.dir.path().join("master.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    m
}

/// The admin token the master made on its first start (the operator routes need one).
fn bootstrap_token(m: &Master) -> Option<String> {
    std::fs::read_to_string(m.dir.path().join("state/admin.token")).ok().map(|t| t.trim().to_string())
}

fn get(m: &Master, path: &str) -> Option<String> {
    let mut req = ureq::get(url_of(m, path));
    if let Some(t) = bootstrap_token(m) {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut r = req.call().ok()?;
    r.body_mut().read_to_string().ok()
}

/// A request to the master with `token` (or none): its status and body.
fn call(m: &Master, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = url_of(m, path);
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut r = match method {
        "GET" => {
            let mut q = agent.get(&url);
            if let Some(a) = &auth {
                q = q.header("Authorization", a);
            }
            q.call().unwrap()
        }
        _ => {
            let mut q = agent.post(&url).header("content-type", "application/json");
            if let Some(a) = &auth {
                q = q.header("Authorization", a);
            }
            q.send(body).unwrap()
        }
    };
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default())
}

/// An operator route asked on the agents' listener, even with the admin token: not found.
fn assert_not_on_the_agents_listener(m: &Master) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let token = bootstrap_token(m).expect("the bootstrap token");
    let r = agent.get(format!("{}/api/fleet/counters", m.url)).header("Authorization", format!("Bearer {token}")).call().unwrap();
    assert_eq!(r.status().as_u16(), 404, "the agents' listener answers an operator route");
}

fn counters(m: &Master, node: &str) -> (u64, u64, u64) {
    let v: Value = serde_json::from_str(&get(m, "/api/fleet/counters").unwrap()).unwrap();
    let c = &v["nodes"][node];
    (c["image_bytes"].as_u64().unwrap_or(0), c["package_bytes"].as_u64().unwrap_or(0), c["verifications"].as_u64().unwrap_or(0))
}

struct Node {
    name: &'static str,
    mac: String,
    storage: PathBuf,
    features: Vec<&'static str>,
}

impl Node {
    fn new(m: &Master, name: &'static str, last: u8) -> Node {
        Node { name, mac: format!("52:54:00:66:00:{last:02x}"), storage: m.dir.path().join("nodes").join(name), features: vec![] }
    }

    fn args(&self, m: &Master, boots: usize) -> Vec<String> {
        let mut a: Vec<String> = ["agent", "node", "--master", &m.url, "--mac", &self.mac, "--type", "linecard", "--arch", "x86_64", "--exec", "--json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--storage".into(), self.storage.display().to_string(), "--boots".into(), boots.to_string()]);
        for f in &self.features {
            a.extend(["--feature".into(), f.to_string()]);
        }
        a
    }

    /// Boots (re-running after a reboot request, at most `boots` times); each boot's
    /// summary, and the package markers printed.
    fn boot(&self, m: &Master, boots: usize) -> (Vec<Value>, Vec<String>) {
        let out = Command::new(EXE).args(self.args(m, boots)).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "agent {} failed:\n{stdout}\n{}", self.name, String::from_utf8_lossy(&out.stderr));
        let summaries = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
        let markers = stdout.lines().filter(|l| l.starts_with("PKG ")).map(str::to_string).collect();
        (summaries, markers)
    }
}

fn verdict(v: &Value) -> &str {
    v["summary"]["verdict"].as_str().unwrap_or("none")
}

fn fetched(v: &Value) -> u64 {
    v["summary"]["fetched_bytes"].as_u64().unwrap()
}

const NODES: &str = r#"
[[class]]
name = "linecards"
packages = { routing = "latest", monitor = "latest" }
[[class]]
name = "edge"
[[node]]
name = "lc1"
mac = "52:54:00:66:00:01"
type = "linecard"
arch = "x86_64"
class = "linecards"
[[node]]
name = "lc2"
mac = "52:54:00:66:00:02"
type = "linecard"
arch = "x86_64"
class = "linecards"
[[node]]
name = "lc3"
mac = "52:54:00:66:00:03"
type = "linecard"
arch = "x86_64"
class = "linecards"
[[node]]
name = "e1"
mac = "52:54:00:66:00:11"
type = "linecard"
arch = "x86_64"
class = "edge"
[[node]]
name = "e2"
mac = "52:54:00:66:00:12"
type = "linecard"
arch = "x86_64"
class = "edge"
"#;

const RELEASE_1: &[(&str, &str, &str, &str)] = &[
    ("base", "1.0", "", "\"core\""),
    ("routing", "1.0", "{ name = \"base\", version = \">=1\" }", "\"bgp\""),
    ("monitor", "1.0", "{ name = \"base\" }", "\"snmp\""),
];

#[test]
fn the_whole_cycle_with_several_agents() {
    let m = start_master();
    let cfg = m.config.to_str().unwrap().to_string();
    let src = bundle_dir(m.dir.path(), "release1", RELEASE_1, NODES);
    let b1 = m.dir.path().join("release1.fbundle");
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", b1.to_str().unwrap()]);
    let dry = ok(&["bundle", "import", b1.to_str().unwrap(), "--dry-run", "-c", &cfg, "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&dry).unwrap()["imported"], false);
    let imported: Value = serde_json::from_str(&ok(&["bundle", "import", b1.to_str().unwrap(), "-c", &cfg, "--json"])).unwrap();
    assert_eq!(imported["nodes_checked"], 5);

    // A bad bundle (a dependency nothing satisfies) is refused by name; nothing imported.
    let packages_before = ok(&["package", "list", "-c", &cfg, "--json"]);
    let bad = bundle_dir(m.dir.path(), "bad", &[("extra", "1.0", "{ name = \"ghost\", version = \">=2\" }", "")], "");
    let bad_file = m.dir.path().join("bad.fbundle");
    ok(&["bundle", "build", bad.to_str().unwrap(), "-o", bad_file.to_str().unwrap()]);
    let (refused, _, err) = cli(&["bundle", "import", bad_file.to_str().unwrap(), "-c", &cfg]);
    assert!(!refused && err.contains("package extra 1.0: depends on ghost >=2, which no package version satisfies"), "{err}");
    assert_eq!(ok(&["package", "list", "-c", &cfg, "--json"]), packages_before);

    let (lc1, lc2, lc3) = (Node::new(&m, "lc1", 1), Node::new(&m, "lc2", 2), Node::new(&m, "lc3", 3));
    let kernel = "lab kernel 1.0".len() as u64;
    let set_bytes = ["base", "routing", "monitor"].iter().map(|p| run_script(p, "1.0").len() as u64).sum::<u64>();

    // Pristine → stored → reboot → verified: the second boot moves nothing.
    for n in [&lc1, &lc2, &lc3] {
        let (boots, markers) = n.boot(&m, 2);
        assert_eq!(boots.len(), 2, "{boots:?}");
        assert_eq!((verdict(&boots[0]), boots[0]["reboot"].as_bool()), ("install", Some(true)));
        assert_eq!(fetched(&boots[0]), kernel + set_bytes);
        assert_eq!((verdict(&boots[1]), fetched(&boots[1])), ("match", 0));
        assert_eq!(markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.0"]);
        assert_eq!(counters(&m, n.name), (kernel, set_bytes, 1), "{}: only the pristine boot moved bytes", n.name);
    }

    // A new preferred version: only routing 1.1's bytes move, and it runs.
    let src2 = bundle_dir(m.dir.path(), "release2", &[("routing", "1.1", "{ name = \"base\", version = \">=1\" }", "\"bgp\"")], "");
    let b2 = m.dir.path().join("release2.fbundle");
    ok(&["bundle", "build", src2.to_str().unwrap(), "-o", b2.to_str().unwrap()]);
    ok(&["bundle", "import", b2.to_str().unwrap(), "-c", &cfg]);
    let (before_img, before_pkg, _) = counters(&m, "lc1");
    let (boots, markers) = lc1.boot(&m, 1);
    assert_eq!((verdict(&boots[0]), fetched(&boots[0])), ("update", run_script("routing", "1.1").len() as u64));
    assert!(markers.contains(&"PKG routing 1.1".to_string()), "{markers:?}");
    let (img, pkg, _) = counters(&m, "lc1");
    assert_eq!((img - before_img, pkg - before_pkg), (0, run_script("routing", "1.1").len() as u64));
    assert_eq!(verdict(&lc1.boot(&m, 1).0[0]), "match");

    // Rollback: back to 1.0 at the next verification.
    ok(&["package", "rollback", "routing", "--to", "1.0", "--class", "linecards", "-c", &cfg]);
    let (boots, markers) = lc1.boot(&m, 1);
    assert_eq!((verdict(&boots[0]), fetched(&boots[0])), ("update", run_script("routing", "1.0").len() as u64));
    assert!(markers.contains(&"PKG routing 1.0".to_string()), "{markers:?}");

    // Test mode: 1.1 runs once from memory; after the reboot the stored 1.0 runs and the
    // local disk is exactly as it was.
    let disk = |n: &Node| {
        let mut files: Vec<(String, Vec<u8>)> = walk(&n.storage).into_iter().map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())).collect();
        files.sort();
        files
    };
    let lc2_disk = disk(&lc2);
    ok(&["node", "set", "lc2", "--test", "routing=1.1", "-c", &cfg]);
    let (boots, markers) = lc2.boot(&m, 1);
    assert_eq!(verdict(&boots[0]), "test");
    assert!(markers.contains(&"PKG routing 1.1".to_string()), "{markers:?}");
    assert_eq!(disk(&lc2), lc2_disk, "test mode stores nothing");
    ok(&["node", "set", "lc2", "--no-test", "-c", &cfg]);
    let (boots, markers) = lc2.boot(&m, 1);
    assert_eq!((verdict(&boots[0]), fetched(&boots[0])), ("match", 0));
    assert!(markers.contains(&"PKG routing 1.0".to_string()), "{markers:?}");
    assert_eq!(disk(&lc2), lc2_disk);

    // A corrupted local package is detected at verification and fetched again.
    let installed: Value = serde_json::from_slice(&std::fs::read(lc3.storage.join("installed.json")).unwrap()).unwrap();
    let routing_blob = installed.as_array().unwrap().iter().find(|i| i["name"] == "routing").unwrap()["files"][0]["sha256"].as_str().unwrap().to_string();
    let blob = lc3.storage.join("blobs").join(&routing_blob);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&blob, bytes).unwrap();
    let (_, before_pkg, _) = counters(&m, "lc3");
    let (boots, _) = lc3.boot(&m, 1);
    assert_eq!((verdict(&boots[0]), fetched(&boots[0])), ("update", run_script("routing", "1.0").len() as u64));
    assert_eq!(counters(&m, "lc3").1 - before_pkg, run_script("routing", "1.0").len() as u64);
    assert_eq!(verdict(&lc3.boot(&m, 1).0[0]), "match");
    let recorded: Value = serde_json::from_str(&ok(&["fleet", "verifications", "--node", "lc3", "-c", &cfg, "--json"])).unwrap();
    let results: Vec<&str> = recorded.as_array().unwrap().iter().map(|r| r["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["install", "match", "update", "match"], "the master records every verification");

    // Features: two nodes of one type and class get different packages.
    let mut e1 = Node::new(&m, "e1", 0x11);
    e1.features = vec!["bgp"];
    let mut e2 = Node::new(&m, "e2", 0x12);
    e2.features = vec!["snmp"];
    let (_, m1) = e1.boot(&m, 2);
    let (_, m2) = e2.boot(&m, 2);
    assert_eq!(m1, ["PKG base 1.0", "PKG routing 1.1"]);
    assert_eq!(m2, ["PKG base 1.0", "PKG monitor 1.0"]);

    // An agent with another key for a known MAC is refused.
    let impostor = Node { storage: m.dir.path().join("impostor"), ..Node::new(&m, "lc1", 1) };
    let (ok_, _, err) = cli(&impostor.args(&m, 1).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok_ && err.contains("forget-key lc1"), "{err}");
}

#[test]
fn prepare_all_nodes_then_a_warm_boot_with_no_download() {
    let m = start_master();
    let cfg = m.config.to_str().unwrap().to_string();
    let src = bundle_dir(m.dir.path(), "release1", RELEASE_1, NODES);
    let b1 = m.dir.path().join("release1.fbundle");
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", b1.to_str().unwrap()]);
    ok(&["bundle", "import", b1.to_str().unwrap(), "-c", &cfg]);
    let nodes = [Node::new(&m, "lc1", 1), Node::new(&m, "lc2", 2), Node::new(&m, "lc3", 3)];
    for n in &nodes {
        n.boot(&m, 2);
    }
    let before: Vec<_> = nodes.iter().map(|n| counters(&m, n.name)).collect();
    // Running agents that stay, heartbeat each second and reboot when told (each reboot
    // is a new boot of the same process, up to 8).
    let mut agents: Vec<Child> = nodes
        .iter()
        .map(|n| {
            let mut a = n.args(&m, 8);
            a.extend(["--stay".into(), "--heartbeat".into(), "1".into()]);
            Command::new(EXE).args(a).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
        })
        .collect();
    let out = cli(&["fleet", "prepare", "--class", "linecards", "--deadline", "60", "-c", &cfg, "--json"]);
    for a in &mut agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    assert!(out.0, "{}\n{}", out.1, out.2);
    let campaign: Value = serde_json::from_str(&out.1).unwrap();
    assert_eq!(campaign["stage"], "done");
    for n in &nodes {
        assert_eq!(campaign["nodes"][n.name], "validated", "{campaign}");
    }
    let kernel = "lab kernel 1.0".len() as u64;
    let set_bytes = ["base", "routing", "monitor"].iter().map(|p| run_script(p, "1.0").len() as u64).sum::<u64>();
    for (n, b) in nodes.iter().zip(&before) {
        let after = counters(&m, n.name);
        // Exactly one more full set per node (the reset); the warm boot moved nothing.
        assert_eq!((after.0 - b.0, after.1 - b.1), (kernel, set_bytes), "{}", n.name);
    }
}

#[test]
fn the_masters_operator_routes_need_a_token_and_record_each_change() {
    let m = start_master();
    let cfg = m.config.to_str().unwrap().to_string();
    let src = bundle_dir(m.dir.path(), "release1", RELEASE_1, NODES);
    let b1 = m.dir.path().join("release1.fbundle");
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", b1.to_str().unwrap()]);
    ok(&["bundle", "import", b1.to_str().unwrap(), "-c", &cfg]);
    let admin = bootstrap_token(&m).expect("the master made a bootstrap token");
    let read_file = m.dir.path().join("viewer.token");
    ok(&["token", "create", "--role", "read", "--name", "viewer", "--config", &cfg, "--output", read_file.to_str().unwrap()]);
    let read = std::fs::read_to_string(&read_file).unwrap().trim().to_string();
    let campaigns = || call(&m, "GET", "/api/fleet/campaigns", Some(&admin), "").1;
    let before = campaigns();
    assert_eq!(before.trim(), "[]");

    // The agents' side needs no token (agents sign each request themselves); the
    // operators' side is not on the agents' listener at all.
    assert_eq!(call(&m, "GET", "/fleet/v1/master-key", None, "").0, 200);
    assert_not_on_the_agents_listener(&m);
    // Reads need a token, of either role.
    for path in ["/api/fleet/nodes", "/api/fleet/counters", "/api/fleet/campaigns", "/api/fleet/packages", "/api/audit"] {
        assert_eq!(call(&m, "GET", path, None, "").0, 401, "{path}");
        assert_eq!(call(&m, "GET", path, Some(&read), "").0, 200, "{path}");
    }
    // The write route: no token, a forged one, a read token — refused, nothing started.
    let body = r#"{"deadline_s": 60}"#;
    let forged = format!("fbt_{}", "A".repeat(43));
    let (status, err) = call(&m, "POST", "/api/fleet/prepare", None, body);
    assert_eq!(status, 401, "{err}");
    assert!(err.contains("\"reason\":\"missing\""), "{err}");
    assert_eq!(call(&m, "POST", "/api/fleet/prepare", Some(&forged), body).0, 401);
    let (status, err) = call(&m, "POST", "/api/fleet/prepare", Some(&read), body);
    assert_eq!(status, 403, "{err}");
    assert_eq!(campaigns(), before, "a refused request started a campaign");
    // The admin token starts one, and the audit log names who did.
    let (status, made) = call(&m, "POST", "/api/fleet/prepare", Some(&admin), body);
    assert_eq!(status, 201, "{made}");
    let id = serde_json::from_str::<Value>(&made).unwrap()["id"].as_str().unwrap().to_string();
    assert!(campaigns().contains(&id));
    let audit: Value = serde_json::from_str(&call(&m, "GET", "/api/audit?limit=1000", Some(&read), "").1).unwrap();
    let entries = audit.as_array().unwrap();
    let posts: Vec<_> = entries.iter().filter(|e| e["action"] == "POST /api/fleet/prepare").collect();
    assert_eq!(posts.len(), 1, "{audit}");
    assert_eq!(posts[0]["actor"], "bootstrap");
    assert_eq!(posts[0]["after"]["deadline_s"], 60);
    // The command line's changes (straight to the store) are in the same log.
    let imported = entries.iter().filter(|e| e["action"] == "fleet.package.add" && e["actor"].as_str().unwrap().starts_with("local:")).count();
    assert_eq!(imported, RELEASE_1.len() + 1, "one entry per package version and the image: {audit}");
    assert!(entries.iter().any(|e| e["action"] == "fleet.class.put" && e["target"] == "fleet/class/linecards"), "{audit}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn fleetboot_serve_runs_the_master_on_its_http_service() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin_port = free_port();
    let config = dir.path().join("fleetboot.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"state\"\n[server]\naddress = \"127.0.0.1\"\nroot = \"root\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[fleet]\nenabled = true\n"
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap().to_string();
    let src = bundle_dir(dir.path(), "release1", RELEASE_1, NODES);
    let b1 = dir.path().join("release1.fbundle");
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", b1.to_str().unwrap()]);
    ok(&["bundle", "import", b1.to_str().unwrap(), "-c", &cfg]);
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = Command::new(EXE).args(["serve", "--config", &cfg]).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let m = Master { dir, config, url: format!("http://127.0.0.1:{port}"), admin: format!("http://127.0.0.1:{admin_port}"), child };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&m, "/fleet/v1/master-key").is_none() {
        assert!(Instant::now() < deadline, "serve did not start: {}", std::fs::read_to_string(m.dir.path().join("serve.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    let lc1 = Node::new(&m, "lc1", 1);
    let (boots, markers) = lc1.boot(&m, 2);
    assert_eq!(boots.iter().map(verdict).collect::<Vec<_>>(), ["install", "match"]);
    assert_eq!(markers, ["PKG base 1.0", "PKG monitor 1.0", "PKG routing 1.0"]);
    // The operators' side of the master is on the admin listener, behind a token; the
    // boot listener the nodes talk to does not carry it.
    assert_not_on_the_agents_listener(&m);
    let admin = format!("http://127.0.0.1:{admin_port}/api/fleet/counters");
    let refused = ureq::get(&admin).config().http_status_as_error(false).build().call().unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let token = std::fs::read_to_string(m.dir.path().join("state/admin.token")).unwrap();
    let mut r = ureq::get(&admin).header("Authorization", format!("Bearer {}", token.trim())).call().unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert!(v["nodes"]["lc1"]["image_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
}

#[test]
fn a_master_that_trusts_a_key_imports_only_bundles_it_signed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ops");
    let made: Value = serde_json::from_str(&ok(&["bundle", "keygen", "-o", key.to_str().unwrap(), "--json"])).unwrap();
    let public = made["key"].as_str().unwrap().to_string();
    let config = dir.path().join("fleetboot.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"state\"\n[server]\naddress = \"127.0.0.1\"\n[dhcp]\nmode = \"off\"\n[fleet]\ntrusted_bundle_keys = [\"{public}\"]\n"),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let src = bundle_dir(dir.path(), "release1", RELEASE_1, NODES);
    let (unsigned, signed) = (dir.path().join("unsigned.fbundle"), dir.path().join("signed.fbundle"));
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", unsigned.to_str().unwrap()]);
    ok(&["bundle", "build", src.to_str().unwrap(), "-o", signed.to_str().unwrap(), "--sign-key", key.with_extension("key").to_str().unwrap()]);
    let (imported, _, err) = cli(&["bundle", "import", unsigned.to_str().unwrap(), "-c", cfg]);
    assert!(!imported && err.contains("manifest.sig: missing"), "{err}");
    assert_eq!(ok(&["package", "list", "-c", cfg, "--json"]).trim(), "[]");
    let plan: Value = serde_json::from_str(&ok(&["bundle", "import", signed.to_str().unwrap(), "-c", cfg, "--json"])).unwrap();
    assert_eq!(plan["signed_by"], public.as_str());
    let listed: Value = serde_json::from_str(&ok(&["package", "list", "-c", cfg, "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4);
}

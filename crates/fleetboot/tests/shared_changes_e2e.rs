//! Two `fleetboot serve` on one PostgreSQL store: a boot profile changed through one
//! server's API decides the next script the other one serves, without restarting it.
//!
//! A private PostgreSQL cluster (`PgCluster`: initdb in a temp directory, Unix socket
//! only, removed on drop); servers "a" and "b" in this process on loopback, each with its
//! own store connections, listener and listening sockets, no DHCP. A client's lease row
//! (127.77.0.9) is in the shared table, so "b" serves that client's script to that address.
//!
//! What is checked:
//! - a profile created, changed and deleted through "a"'s API shows up in, changes and
//!   leaves the script "b" serves that client;
//! - "b"'s listening connection killed in the database (`pg_terminate_backend`, found by
//!   its `application_name`) after a change whose notice it never hears (the row updated
//!   directly, as a change whose notice was lost): once "b" has listened again (a new
//!   connection of that name) its script has that change — it read every profile again.
//!
//! `serve_waits_for_a_database_that_is_not_up_yet` starts `fleetboot serve` (a process)
//! on a cluster that is stopped: it must keep trying (two failed attempts in its log, the
//! process alive) and, once the cluster is started, serve — its listening connection in
//! `pg_stat_activity` — rather than exit.
//!
//! The waits poll "b"'s script until it has changed or `HANG` ran out (a failure: the
//! change never arrived); the time each change took to reach "b" is printed, not asserted.
//!
//! Gating: PostgreSQL (`scripts/setup.sh`); otherwise it says why and passes, unless
//! `FLEETBOOT_REQUIRE_E2E=1`. Network safety: loopback only.

mod loopback;

use fleetboot_store::testing::{PgCluster, PgOptions};
use loopback::{Loopback, HANG};
use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MAC: &str = "52:54:00:77:5e:09";
const CLIENT: &str = "127.77.0.9";

fn psql(pg: &PgCluster, sql: &str) -> String {
    let (socket_dir, port) = (pg.socket_dir().display().to_string(), pg.port().to_string());
    let out = std::process::Command::new("psql")
        .args(["-h", &socket_dir, "-p", &port, "-U", "fleetboot", "-d", "fleetboot", "-v", "ON_ERROR_STOP=1"])
        .args(["-X", "-A", "-t", "-c", sql])
        .output()
        .expect("running psql");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn profile(marker: &str) -> String {
    format!(
        r##"{{"name":"shared-notice","priority":5,"match":{{"mac":["{MAC}"]}},"boot":{{"kind":"script","script":"#!ipxe\necho {marker} {{mac}}\nexit 1\n"}}}}"##
    )
}

/// The script `server` serves the client, as the client asks for it.
async fn script_served_by(server: &Loopback) -> String {
    let from: IpAddr = CLIENT.parse().unwrap();
    let (code, body) = server.http_get_from(from, &format!("/boot/{}.ipxe", MAC.replace(':', "-"))).await;
    format!("{code} {}", String::from_utf8_lossy(&body))
}

/// Polls "b" until its script for the client satisfies `done`; how long that took.
async fn until_b_serves(b: &Loopback, what: &str, done: impl Fn(&str) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let script = script_served_by(b).await;
        if done(&script) {
            return start.elapsed();
        }
        assert!(start.elapsed() < HANG, "server b never served {what}; it serves:\n{script}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn sections(pg: &PgCluster, name: &str) -> String {
    format!("[store]\nurl = \"{}\"\nname = \"{name}\"\n", pg.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_changed_through_one_server_decides_the_others_next_script() {
    if !fleetboot_store::testing::ready("a_profile_changed_through_one_server_decides_the_others_next_script") {
        return;
    }
    let pg = PgCluster::start(PgOptions::default()).expect("starting a private PostgreSQL");
    let a = Loopback::start("shared-changes-a", "off", &sections(&pg, "a")).await;
    let b = Loopback::start("shared-changes-b", "off", &sections(&pg, "b")).await;
    let token = a.bootstrap_token();

    // The client holds a lease in the shared table: "b" serves it its script.
    let expires = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    psql(
        &pg,
        &format!(
            "INSERT INTO leases (ip, mac, client_id, expires_at, hostname, state) VALUES ('{CLIENT}', '{MAC}', NULL, {expires}, NULL, 'bound')"
        ),
    );
    let before = script_served_by(&b).await;
    assert!(before.starts_with("200 ") && !before.contains("marker-"), "before any profile: {before}");

    let mut latencies = Vec::new();
    let (code, body) = a.api("POST", "/api/profiles", Some(&token), Some(&profile("marker-one"))).await;
    assert_eq!(code, 201, "POST to a: {}", String::from_utf8_lossy(&body));
    latencies.push(("create", until_b_serves(&b, "the created profile", |s| s.contains("echo marker-one")).await));

    let (code, body) = a.api("PUT", "/api/profiles/shared-notice", Some(&token), Some(&profile("marker-two"))).await;
    assert_eq!(code, 200, "PUT to a: {}", String::from_utf8_lossy(&body));
    latencies.push(("change", until_b_serves(&b, "the changed profile", |s| s.contains("echo marker-two")).await));

    // A change "b" hears no notice of (the row changed directly), then "b"'s listening
    // connection killed: after listening again it reads every profile.
    psql(&pg, "UPDATE profiles SET json = replace(json, 'marker-two', 'marker-three') WHERE name = 'shared-notice'");
    assert!(script_served_by(&b).await.contains("echo marker-two"), "b changed without being told");
    let listener = format!("fleetboot-listen {}", b.server.shared().store.notice_origin().expect("a shared store"));
    let old_pid = psql(&pg, &format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{listener}'"));
    assert_eq!(old_pid.lines().count(), 1, "one listening connection of b: {old_pid:?}");
    let killed = Instant::now();
    let terminated = psql(&pg, &format!("SELECT pg_terminate_backend({old_pid})"));
    assert_eq!(terminated, "t");
    latencies.push(("missed, after the listener was killed", until_b_serves(&b, "the change made while it was not listening", |s| s.contains("echo marker-three")).await));
    let new_pid = psql(&pg, &format!("SELECT pid FROM pg_stat_activity WHERE application_name = '{listener}'"));
    assert!(new_pid.lines().count() == 1 && new_pid != old_pid, "b listens again on a new connection: {old_pid} then {new_pid:?}");
    let reconnected = killed.elapsed();

    // And after the reconnection, notices are heard again.
    let (code, body) = a.api("DELETE", "/api/profiles/shared-notice", Some(&token), None).await;
    assert_eq!(code, 204, "DELETE to a: {}", String::from_utf8_lossy(&body));
    latencies.push(("delete", until_b_serves(&b, "the deleted profile gone", |s| s.starts_with("200 ") && !s.contains("marker-")).await));
    assert_eq!(script_served_by(&a).await, script_served_by(&b).await, "a and b serve the client the same script");

    for (what, took) in &latencies {
        println!("propagation a -> b, {what}: {took:?}");
    }
    println!("b listening again within {reconnected:?} of its connection being killed");
    b.server.shutdown().await.unwrap();
    a.server.shutdown().await.unwrap();
}

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");

fn log_count(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches(needle).count()
}

/// Waits until `log` holds `needle` `n` times, the process still running.
fn until_logged(child: &mut Child, log: &std::path::Path, needle: &str, n: usize) {
    let start = Instant::now();
    while log_count(log, needle) < n {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("fleetboot serve ended ({status}) before logging {needle:?} {n} times:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        assert!(start.elapsed() < HANG * 2, "{needle:?} not logged {n} times:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_waits_for_a_database_that_is_not_up_yet() {
    if !fleetboot_store::testing::ready("serve_waits_for_a_database_that_is_not_up_yet") {
        return;
    }
    let mut pg = PgCluster::start(PgOptions::default()).expect("starting a private PostgreSQL");
    pg.stop("fast").expect("stopping it");
    let dir = loopback::TestDir::new("shared-late-db");
    std::fs::create_dir_all(dir.0.join("root")).unwrap();
    let config = dir.0.join("fleetboot.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{data}\"\n[server]\naddress = \"127.0.0.1\"\ninterface = \"lo\"\nroot = \"{root}\"\n\
             [dhcp]\nmode = \"off\"\n[tftp]\nenabled = false\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [store]\nurl = \"{url}\"\nname = \"late\"\n",
            data = dir.0.join("data").display(),
            root = dir.0.join("root").display(),
            url = pg.url(),
        ),
    )
    .unwrap();
    let log = dir.0.join("serve.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("starting fleetboot serve");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        until_logged(&mut child, &log, "waiting for it before serving", 2);
        pg.start_again().expect("starting the cluster again");
        until_logged(&mut child, &log, "fleetboot serving", 1);
        assert_eq!(log_count(&log, "the shared store answers: starting"), 1);
        let listening = psql(&pg, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fleetboot-listen %'");
        assert_eq!(listening, "1", "the late server listens for the others' changes");
        println!("attempts before the database answered: {}", log_count(&log, "waiting for it before serving"));
    }));
    let _ = child.kill();
    let _ = child.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

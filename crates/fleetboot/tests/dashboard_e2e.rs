//! End to end: the operators' dashboard in a real browser (headless Chromium driven over
//! WebDriver by `dashboard/drive.py`, inside the server's namespace where the admin
//! listener is) while real clients boot: dhclient takes a lease and tftp-hpa fetches a
//! file (its row advances to TFTP, done), another client takes a lease and goes quiet
//! (flagged stuck), both arriving on a page that was open before they started — the live
//! updates, not a reload, bring them. The client's timeline opens from its row. The
//! panels below the rows: an image imported while the page is open appears in the images
//! panel, the `[stream]` section's session in the streams panel, and the features not
//! configured (edge caches, negotiators, nodes) say so.
//! Screenshots land in the test directory (kept with `FLEETBOOT_E2E_KEEP=1`).
//!
//! Also: the page without a session is the login form, and the session cookie may read
//! but not change anything.
//!
//! Needs root, dhclient, tftp-hpa, chromium and chromium-driver.

mod common;

use common::{e2e_ready, host, s, Dhclient, Env, API, BIN};
use fleetboot_lab::netns::CLIENT_IF;
use serde_json::Value;
use std::fs;
use std::time::{Duration, Instant};

const BOOTING: &str = "52:54:00:77:0d:01";
const QUIET: &str = "52:54:00:77:0d:02";
const IMAGE: &str = "dash-disk";

#[test]
fn the_dashboard_follows_clients_live_in_a_browser() {
    if !e2e_ready("the_dashboard_follows_clients_live_in_a_browser", &["dhclient", "tftp", "chromium", "chromedriver", "python3"]) {
        return;
    }
    let mut env = Env::new("dashboard");
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str("\n[admin]\ndashboard_stuck_after = 3\n");
    // A stream session for the streams panel (`fleetboot serve` lists it; it does not send it).
    cfg.push_str(&format!(
        "\n[stream]\nsite_secret_file = \"{}\"\n\n[[stream.session]]\nimage = \"{IMAGE}\"\nrate = 1000000\n",
        s(&env.dir.join("stream.secret"))
    ));
    fs::write(&env.config, cfg).unwrap();
    env.put_file("undionly.kpxe", &common::random_bytes(7, 300_000));
    env.start_server();
    let srv = env.server_ns();
    let token_file = env.dir.join("data/admin.token");

    // The session cookie reads; it never changes anything, whatever page sent it.
    let token = env.token();
    let cookie = format!("Cookie: fleetboot_session={token}");
    let (code, _) = env.http(&srv, &["-H", &cookie], &format!("{API}/api/dashboard"));
    assert_eq!(code, 200, "the cookie may read");
    let post = ["-H", &cookie, "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}"];
    let (code, _) = env.http(&srv, &post, &format!("{API}/api/profiles"));
    assert_eq!(code, 401, "the cookie must not change anything");

    // The browser opens the dashboard before any client exists.
    let out = env.dir.join("browser");
    fs::create_dir_all(&out).unwrap();
    let drive = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard/drive.py");
    let expect = format!("{{\"{BOOTING}\": \"done\", \"{QUIET}\": \"stuck\"}}");
    let panels = format!("{{\"images\": \"{IMAGE}:1\", \"streams\": \"{IMAGE}\"}}");
    let mut cmd = env.lab.cmd(&srv, "timeout");
    cmd.args(["-k", "5", "240", "python3", drive, API, &s(&token_file), &s(&out), &expect, &panels]);
    let mut browser = env.lab.spawn_tracked(&mut cmd).expect("starting the browser driver");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("ready").exists() && !out.join("result.json").exists() {
        assert!(Instant::now() < deadline, "the browser did not open the dashboard");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A client that boots: a lease, then its boot file over TFTP.
    let a = env.add_client(None, Some(BOOTING));
    let ip = Dhclient::new(&env, &a, "booting").obtain(&mut env);
    env.ip(&a.ns, &["addr", "add", &format!("{ip}/24"), "dev", CLIENT_IF]);
    let got = env.dir.join("undionly.kpxe");
    env.run_ok(&a.ns, &["tftp", "10.77.0.1", "-m", "binary", "-c", "get", "undionly.kpxe", &s(&got)], 60);
    // A client that takes a lease and never comes back for its boot file.
    let b = env.add_client(None, Some(QUIET));
    Dhclient::new(&env, &b, "quiet").obtain(&mut env);
    // An image imported while the page is open: the images panel is pushed to it.
    let disk = env.dir.join("disk.raw");
    fs::write(&disk, common::random_bytes(8, 1 << 20)).unwrap();
    let imported = host(&[BIN, "image", "import", &s(&disk), "--name", IMAGE, "--config", &s(&env.config)], 60);
    assert!(imported.contains(&format!("imported {IMAGE}:1")), "{imported}");

    let status = browser.wait().expect("waiting for the browser driver");
    let result: Value = serde_json::from_str(&fs::read_to_string(out.join("result.json")).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no result from the browser ({status}): {e}\n{}", env.log_tail()));
    assert!(result.get("error").is_none(), "the browser run failed: {result:#}");
    let steps = result["steps"].as_array().unwrap();
    let step = |name: &str| steps.iter().find(|s| s["step"] == name).unwrap_or_else(|| panic!("no step {name}: {result:#}"));

    let login = step("no session");
    assert!(login["url"].as_str().unwrap().ends_with("/dashboard/login") && login["has_form"] == true, "{login}");
    let signed = step("signed in");
    assert!(signed["url"].as_str().unwrap().ends_with("/dashboard"), "{signed}");
    assert_eq!(signed["live"], "live", "the page follows the server's events: {signed}");
    assert_eq!(signed["rows"], 0, "no client yet when the page opened: {signed}");

    let rows = step("rows");
    assert_eq!(rows["seen"][BOOTING]["status"], "done", "{rows}");
    assert_eq!(rows["seen"][BOOTING]["stage"], "TFTP", "{rows}");
    assert_eq!(rows["seen"][QUIET]["status"], "stuck", "{rows}");
    assert_eq!(rows["seen"][QUIET]["stage"], "DHCP", "{rows}");
    assert_eq!(rows["reloads"], 1, "rows arrived without reloading the page: {rows}");
    let panel = |name: &str| &rows["panels"][name];
    assert!(panel("images")["keys"].as_array().unwrap().contains(&Value::from(format!("{IMAGE}:1"))), "the imported image, pushed: {rows}");
    assert!(panel("streams")["configured"] == true && panel("streams")["keys"][0] == IMAGE, "the [stream] session: {rows}");
    for (off, section) in [("caches", "[origin]"), ("negotiators", "[negotiate]"), ("nodes", "[fleet]")] {
        assert_eq!(panel(off)["configured"], false, "{off} is not configured here: {rows}");
        assert!(panel(off)["note"].as_str().unwrap().contains(section), "{off} says which section it needs: {rows}");
    }

    let timeline = step("timeline");
    assert!(timeline["url"].as_str().unwrap().ends_with(&format!("/dashboard/client/{BOOTING}")), "{timeline}");
    let events: Vec<&str> = timeline["events"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for kind in ["DHCPOFFER", "DHCPACK", "TFTP-RRQ", "TFTP-DONE"] {
        assert!(events.contains(&kind), "{kind} in the timeline: {events:?}");
    }
    for png in ["dashboard.png", "timeline.png"] {
        let bytes = fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "{png}: a real screenshot");
    }

    // The same rows for scripts, with the bytes the client was sent.
    let (code, body) = env.api(&[], "/api/dashboard");
    assert_eq!(code, 200);
    let snapshot: Value = serde_json::from_slice(&body).unwrap();
    let booting = snapshot["clients"].as_array().unwrap().iter().find(|r| r["mac"] == BOOTING).expect("the booting client's row");
    assert_eq!(booting["sent_bytes"], 300_000, "{booting}");
    assert_eq!(booting["ip"], ip.to_string(), "{booting}");
    // ... and the panels, with what the page shows.
    let image = &snapshot["images"]["items"][0];
    assert_eq!((image["name"].as_str(), image["version"].as_u64(), image["size"].as_u64()), (Some(IMAGE), Some(1), Some(1 << 20)), "{snapshot:#}");
    assert_eq!(image["sha256"], common::sha256(&disk), "{snapshot:#}");
    assert_eq!(snapshot["streams"]["items"][0]["rate"], 1_000_000, "{snapshot:#}");
    assert_eq!(snapshot["caches"]["configured"], false, "{snapshot:#}");
}

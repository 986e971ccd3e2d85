//! End to end: the operators' dashboard in a real browser (headless Chromium driven over
//! WebDriver by `dashboard/drive.py`, inside the server's namespace where the admin
//! listener is) while real clients boot: dhclient takes a lease and tftp-hpa fetches a
//! file (its row advances to TFTP, done), another client takes a lease and goes quiet
//! (flagged stuck), both arriving on a page that was open before they started — the live
//! updates, not a reload, bring them. The client's timeline opens from its row. The
//! panels below the rows: an image imported while the page is open appears in the images
//! panel, the `[stream]` section's session in the streams panel, and the features not
//! configured (edge caches, nodes) say so.
//!
//! Live figures in the panels, each step started by the test only once the page showed the
//! one before (so the numbers must change, whatever the timing):
//! - a real `fleetboot stream serve` of the imported image shows as announcing with no
//!   receiver; then a `fleetboot agent stream` in a client namespace receives it, and the
//!   page shows the session done, one receiver complete, at least the image's size sent;
//! - the negotiator and file server inside `fleetboot serve` (`[negotiate]`, `[files]`): a
//!   PXE ROM's boot server discovery for the multicast file makes the group it is handed
//!   show with one client; a second ROM (another MAC) makes it two.
//!
//! Screenshots land in the test directory (kept with `FLEETBOOT_E2E_KEEP=1`).
//!
//! Also: the page without a session is the login form, and the session cookie may read
//! but not change anything.
//!
//! Needs root, dhclient, tftp-hpa, chromium and chromium-driver.
//!
//! Network safety: only the lab's namespaces; multicast leaves on `srv0` with TTL 1.

mod common;

use common::{e2e_ready, host, s, Dhclient, Env, API, BIN};
use fleetboot_dhcp::codec::{opt, BOOTREQUEST};
use fleetboot_dhcp::pxe::{BootItem, PxeOptions};
use fleetboot_dhcp::{DhcpMessage, MessageType};
use fleetboot_lab::netns::{Proto, CLIENT_IF};
use serde_json::{json, Value};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

const BOOTING: &str = "52:54:00:77:0d:01";
const QUIET: &str = "52:54:00:77:0d:02";
const IMAGE: &str = "dash-disk";
const IMAGE_BYTES: usize = 1 << 20;
/// The PXE ROMs' and the stream receiver's namespace, outside the DHCP range.
const ROM_ADDR: &str = "10.77.0.50";
const MULTICAST_FILE: &str = "pxe-a.0";

/// A PXE ROM's boot server discovery REQUEST for the first multicast file (item 0x8000).
fn discovery_request(mac: [u8; 6]) -> Vec<u8> {
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&mac);
    let mut m = DhcpMessage { op: BOOTREQUEST, xid: 0x4011_0d00 | mac[5] as u32, ciaddr: ROM_ADDR.parse::<Ipv4Addr>().unwrap(), chaddr, ..DhcpMessage::default() };
    m.set_option(opt::MESSAGE_TYPE, vec![MessageType::Request as u8]);
    m.set_option(opt::VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001".to_vec());
    m.set_option(opt::CLIENT_ARCH, vec![0, 0]);
    let pxe = PxeOptions { boot_item: Some(BootItem { server_type: 0x8000, layer: 0 }), ..Default::default() };
    m.set_option(opt::VENDOR_SPECIFIC, pxe.encode());
    m.encode()
}

/// Sends the discovery of `mac` to 10.77.0.1:4011 from the ROMs' namespace until the answer
/// names a file (wait packets come first while the negotiator clears a group); the file.
fn discover(env: &mut Env, ns: &str, mac: [u8; 6]) -> String {
    const ROM: &str = r#"
import socket, sys, time
req = bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 68)); s.settimeout(0.3)
end = time.time() + 30
while time.time() < end:
    s.sendto(req, ("10.77.0.1", 4011))
    try:
        m = s.recv(2048)
    except socket.timeout:
        continue
    f = m[108:236].split(b"\0")[0]
    if f:
        print(f.decode()); sys.exit(0)
    time.sleep(0.1)
sys.exit("no file from 4011")
"#;
    let hex: String = discovery_request(mac).iter().map(|b| format!("{b:02x}")).collect();
    let out = env.run_ok(ns, &["python3", "-c", ROM, ROM_ADDR, &hex], 45);
    out.stdout_str().trim().to_string()
}

/// Waits (bounded) until the browser driver reached `stage` (or gave up: it wrote its result).
fn wait_stage(out: &Path, stage: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if out.join(format!("stage-{stage}")).exists() {
            return true;
        }
        if out.join("result.json").exists() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn the_dashboard_follows_clients_live_in_a_browser() {
    if !e2e_ready("the_dashboard_follows_clients_live_in_a_browser", &["dhclient", "tftp", "chromium", "chromedriver", "python3"]) {
        return;
    }
    let mut env = Env::new("dashboard");
    let mut cfg = fs::read_to_string(&env.config).unwrap();
    cfg.push_str("\n[admin]\ndashboard_stuck_after = 3\n");
    // A stream session for the streams panel, sent by `fleetboot stream serve` (another
    // process: it reports to the board through data_dir/status).
    let secret = env.dir.join("stream.secret");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let hex: String = common::random_bytes(0x5EC, 32).iter().map(|b| format!("{b:02x}")).collect();
        fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&secret).unwrap();
        fs::write(&secret, format!("{hex}\n")).unwrap();
    }
    cfg.push_str(&format!(
        "\n[stream]\nsite_secret_file = \"{}\"\n\n[[stream.session]]\nimage = \"{IMAGE}\"\nrate = 1000000\n",
        s(&secret)
    ));
    // The agent reads what the stream has not brought yet from serve's NBD service.
    cfg.push_str("\n[nbd]\nenabled = true\nlisten = \"0.0.0.0:10809\"\n");
    // A negotiator and a multicast file server inside serve: the groups they hand out.
    cfg.push_str(&format!(
        "\n[negotiate]\nboot_files = [\"{MULTICAST_FILE}\"]\nfile_servers = [\"10.77.0.1\"]\ngroups = [\"239.255.77.10\", \"239.255.77.20\"]\n\
         peer_group = \"239.255.77.1\"\nwait_period_ms = 200\n\n[files]\npeer_group = \"239.255.77.1\"\nrfc2090_port = 1069\n"
    ));
    fs::write(&env.config, cfg).unwrap();
    env.put_file("undionly.kpxe", &common::random_bytes(7, 300_000));
    env.put_file(MULTICAST_FILE, &common::random_bytes(9, 50_000));
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
    // The live figures, stage by stage (the test moves them on between stages).
    let stream = |equal: Value, at_least: Value| json!({"panel": "streams", "key_prefix": IMAGE, "equal": equal, "at_least": at_least});
    let group = |clients: u32| json!({"panel": "negotiators", "key_prefix": "negotiator/239.255.77.", "equal": {"clients": clients.to_string()}});
    let stages = json!([
        {"name": "announcing", "rows": [stream(json!({"state": "announcing", "receivers": "0"}), json!({}))]},
        {"name": "one-rom", "rows": [group(1)]},
        {"name": "streamed", "rows": [stream(json!({"state": "done", "receivers": "1", "complete": "1"}), json!({"bytes": IMAGE_BYTES}))]},
        {"name": "two-roms", "rows": [group(2)]},
    ])
    .to_string();
    let mut cmd = env.lab.cmd(&srv, "timeout");
    cmd.args(["-k", "5", "300", "python3", drive, API, &s(&token_file), &s(&out), &expect, &panels, &stages]);
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
    fs::write(&disk, common::random_bytes(8, IMAGE_BYTES)).unwrap();
    let imported = host(&[BIN, "image", "import", &s(&disk), "--name", IMAGE, "--config", &s(&env.config)], 60);
    assert!(imported.contains(&format!("imported {IMAGE}:1")), "{imported}");

    // The image's stream session: it announces and waits for a receiver.
    let mut cmd = env.lab.cmd(&srv, "timeout");
    cmd.args(["-k", "5", "120", BIN, "stream", "serve", "--config", &s(&env.config)])
        .env("RUST_LOG", "info")
        .stderr(fs::File::create(env.dir.join("stream.log")).unwrap());
    let mut sender = env.lab.spawn_tracked(&mut cmd).expect("starting the stream sender");
    // One PXE ROM asks the negotiator for the multicast file.
    let roms = env.add_client(Some(&format!("{ROM_ADDR}/24")), None);
    assert_eq!(discover(&mut env, &roms.ns, [0x02, 0xfb, 0, 0, 0x0d, 1]), MULTICAST_FILE);
    // Once the page shows both: a receiver for the stream, a second ROM for the group.
    let shown = wait_stage(&out, "one-rom");
    let mut receiver = None;
    if shown {
        let cache = env.dir.join("agent-cache");
        // Receivers take only blocks the sender signed: the agent gets the public half of
        // the key `stream serve` made in data_dir on its start.
        let sender_key = fleetboot_streamd::secret::public_key_path(&fleetboot_streamd::secret::signing_key_path(&env.dir.join("data")));
        for _ in 0..100 {
            if sender_key.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut cmd = env.lab.cmd(&roms.ns, "timeout");
        cmd.args(["-k", "5", "90", BIN, "agent", "stream", "--server", "10.77.0.1:10809", "--image", IMAGE, "--interface", CLIENT_IF])
            .args(["--cache", &s(&cache), "--nbd-listen", "127.0.0.1:10810", "--site-secret-file", &s(&secret), "--exit-when-complete"])
            .args(["--sender-key-file", &s(&sender_key)])
            .stdout(fs::File::create(env.dir.join("agent.out")).unwrap())
            .stderr(fs::File::create(env.dir.join("agent.log")).unwrap());
        receiver = Some(env.lab.spawn_tracked(&mut cmd).expect("starting the stream receiver"));
        env.lab.wait_listening(&roms.ns, Proto::Tcp, 10810, Duration::from_secs(30)).ok();
        assert_eq!(discover(&mut env, &roms.ns, [0x02, 0xfb, 0, 0, 0x0d, 2]), MULTICAST_FILE);
    }

    let status = browser.wait().expect("waiting for the browser driver");
    env.lab.untrack(browser.id());
    let received = receiver.map(|mut r| {
        let st = r.wait().expect("waiting for the stream receiver");
        env.lab.untrack(r.id());
        st
    });
    let sent = sender.wait().expect("waiting for the stream sender");
    env.lab.untrack(sender.id());
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
    for (off, section) in [("caches", "[origin]"), ("nodes", "[fleet]")] {
        assert_eq!(panel(off)["configured"], false, "{off} is not configured here: {rows}");
        assert!(panel(off)["note"].as_str().unwrap().contains(section), "{off} says which section it needs: {rows}");
    }

    // The live figures, as the page showed them at each stage.
    let stage_rows = |name: &str| -> Vec<Value> {
        let st = step(&format!("stage {name}"));
        assert_eq!(st["reached"], true, "the page never showed stage {name}: {st:#}\nstream sender: {}\nagent: {}", common::tail(&env.dir.join("stream.log"), 20), common::tail(&env.dir.join("agent.log"), 20));
        assert_eq!(st["reloads"], 1, "pushed, not reloaded: {st}");
        st["rows"].as_array().unwrap().clone()
    };
    let num = |row: &Value, attr: &str| -> u64 { row["data"][attr].as_str().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {attr} in {row}")) };
    let announcing = &stage_rows("announcing")[0];
    let one_rom = &stage_rows("one-rom")[0];
    let streamed = &stage_rows("streamed")[0];
    let two_roms = &stage_rows("two-roms")[0];
    assert!(received.as_ref().is_some_and(|s| s.success()), "the agent received the image: {received:?}\n{}", common::tail(&env.dir.join("agent.log"), 20));
    assert!(sent.success(), "the sender ends well once its receiver is complete: {sent}\n{}", common::tail(&env.dir.join("stream.log"), 20));
    assert_eq!((num(announcing, "receivers"), num(streamed, "receivers"), num(streamed, "complete")), (0, 1, 1), "{announcing}\n{streamed}");
    assert!(num(streamed, "bytes") >= IMAGE_BYTES as u64 && num(streamed, "bytes") > num(announcing, "bytes"), "bytes sent grew to the image's size: {announcing}\n{streamed}");
    assert_eq!(num(streamed, "size"), IMAGE_BYTES as u64);
    let egress = streamed["cells"][9].as_str().unwrap();
    assert!(egress.contains("× of 1.0 MiB"), "egress against the image: {streamed}");
    // The group the negotiator handed out, with its file, one client then two.
    assert_eq!((num(one_rom, "clients"), num(two_roms, "clients")), (1, 2), "{one_rom}\n{two_roms}");
    assert_eq!((one_rom["cells"][0].as_str(), one_rom["cells"][3].as_str()), (Some("negotiator"), Some(MULTICAST_FILE)), "{one_rom}");
    assert_eq!(one_rom["key"], two_roms["key"], "the same group");

    let timeline = step("timeline");
    assert!(timeline["url"].as_str().unwrap().ends_with(&format!("/dashboard/client/{BOOTING}")), "{timeline}");
    let events: Vec<&str> = timeline["events"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for kind in ["DHCPOFFER", "DHCPACK", "TFTP-RRQ", "TFTP-DONE"] {
        assert!(events.contains(&kind), "{kind} in the timeline: {events:?}");
    }
    for png in ["dashboard.png", "panels.png", "timeline.png"] {
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
    let live = &snapshot["streams"]["items"][0]["live"];
    assert_eq!((live["state"].as_str(), live["complete"].as_u64(), live["image_size"].as_u64()), (Some("done"), Some(1), Some(IMAGE_BYTES as u64)), "{snapshot:#}");
    let file_server = snapshot["negotiators"]["items"].as_array().unwrap().iter().find(|i| i["role"] == "file server").expect("the file server");
    assert_eq!(file_server["slots"][0]["file"], MULTICAST_FILE, "the file server carries the group it was asked to prepare: {snapshot:#}");
}

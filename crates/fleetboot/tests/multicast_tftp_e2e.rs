//! atftp's RFC 2090 multicast client against `fleetboot files` in private namespaces: one
//! client, then a second that joins while the first transfer flows (it takes what is
//! flowing and, made master in turn, fetches the head it missed). Both files must be
//! byte-identical; the late join is checked from the file server's own records.
//!
//! The late join is arranged by events, not by timing: the file server's link is
//! throttled (tbf) to a rate at which the file takes minutes, the second client starts
//! once the server has recorded the first one's join as master, and the throttle is lifted
//! once the server has recorded the second one's join.

mod mcast_common;

use fleetboot_lab::gate::e2e_ready;
use fleetboot_lab::netns::Lab;
use mcast_common::*;
use std::time::Duration;

#[test]
fn atftp_rfc2090_multicast_with_a_late_joiner() {
    if !e2e_ready(
        "atftp_rfc2090_multicast_with_a_late_joiner",
        &["atftp", "timeout", "tc"],
    ) {
        return;
    }
    let dir = work_dir("mtftp-e2e");
    // 1 MiB: 2048 blocks of 512, lock-step; at the throttled rate below ~2 minutes.
    let data = random_bytes(2090, 1 << 20);
    std::fs::write(dir.join("root/big.img"), &data).unwrap();
    let mut lab = Lab::new().unwrap();
    let fs = lab.add_client(Some("10.77.0.21/24")).unwrap();
    let c1 = lab.add_client(Some("10.77.0.31/24")).unwrap();
    let c2 = lab.add_client(Some("10.77.0.32/24")).unwrap();
    let cfg = dir.join("files.toml");
    let recs = dir.join("files.jsonl");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[server]\naddress = \"10.77.0.21\"\ninterface = \"eth0\"\nroot = \"{}\"\n[dhcp]\nmode = \"off\"\n\
             [files]\nrfc2090_port = 69\nrfc2090_groups = [\"239.255.209.1\", \"239.255.209.9\"]\nrecords = \"{}\"\n",
            dir.join("data").display(),
            dir.join("root").display(),
            recs.display()
        ),
    )
    .unwrap();
    spawn_fleetboot(&mut lab, &fs.ns, "files", &cfg, &dir.join("files.log"), 120);
    wait_udp(&lab, &fs.ns, 69);

    let atftp = |lab: &Lab, ns: &str, out: &std::path::Path| {
        let mut c = lab.cmd(ns, "timeout");
        c.args([
            "60",
            "atftp",
            "--option",
            "multicast",
            "--option",
            "blksize 512",
            "-g",
            "-r",
            "big.img",
            "-l",
        ])
        .arg(out)
        .args(["10.77.0.21", "69"]);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        lab.spawn_tracked(&mut c).unwrap()
    };
    let (o1, o2) = (dir.join("out1"), dir.join("out2"));
    // 64 kbit/s out of the file server: ~15 blocks of 512 a second, so the transfer cannot
    // end while the second client starts (lock-step: one block queued at a time, no drops).
    let tc = |args: &[&str]| {
        let mut full = vec!["tc", "qdisc"];
        full.extend_from_slice(args);
        lab.exec(&fs.ns, &full, Duration::from_secs(10)).expect("tc");
    };
    tc(&["add", "dev", "eth0", "root", "tbf", "rate", "64kbit", "burst", "1600", "latency", "10s"]);
    let a1 = atftp(&lab, &c1.ns, &o1);
    let joined = |who: &str| {
        let who = format!("{who}:");
        move |r: &serde_json::Value| {
            r["event"] == "rfc2090_join" && r["client"].as_str().is_some_and(|c| c.starts_with(&who))
        }
    };
    wait_record(&recs, joined("10.77.0.31"), Duration::from_secs(30));
    let a2 = atftp(&lab, &c2.ns, &o2);
    wait_record(&recs, joined("10.77.0.32"), Duration::from_secs(30));
    tc(&["del", "dev", "eth0", "root"]);
    let (p1, p2) = (a1.id(), a2.id());
    let r1 = a1.wait_with_output().unwrap();
    let r2 = a2.wait_with_output().unwrap();
    lab.untrack(p1);
    lab.untrack(p2);
    let log = std::fs::read_to_string(dir.join("files.log")).unwrap_or_default();
    for (i, r) in [(1, &r1), (2, &r2)] {
        assert!(
            r.status.success(),
            "atftp {i}: {}\n{}\n{}\nserver log:\n{log}",
            r.status,
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    let got1 = std::fs::read(&o1).unwrap();
    let got2 = std::fs::read(&o2).unwrap();
    assert!(got1 == data, "client 1: {} bytes, differs", got1.len());
    assert!(
        got2 == data,
        "client 2 (late): {} bytes, differs",
        got2.len()
    );
    // From the file server's records: one group for the file, and client 2 joined while a
    // transfer was flowing, as a listener.
    let recs = records(&recs);
    assert!(
        recs.iter().any(|r| r["event"] == "rfc2090_join"
            && r["client"].as_str().is_some_and(|c| c.starts_with("10.77.0.31:"))
            && r["master"] == true),
        "client 1 did not open the transfer as master: {recs:?}"
    );
    let joins: Vec<_> = recs
        .iter()
        .filter(|r| r["event"] == "rfc2090_join")
        .collect();
    let late = joins
        .iter()
        .find(|r| {
            r["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("10.77.0.32:"))
        })
        .unwrap_or_else(|| panic!("no join from client 2 in {joins:?}"));
    assert_eq!(
        late["flowing"], true,
        "client 2 did not join mid-transfer: {late}"
    );
    assert_eq!(late["master"], false, "{late}");
    eprintln!("file server records: {joins:?}");
    let groups: Vec<_> = recs.iter().filter(|r| r["event"] == "configured").collect();
    assert!(!groups.is_empty());
    assert!(
        groups
            .iter()
            .all(|g| g["group"] == groups[0]["group"] && g["file"] == "big.img"),
        "{groups:?}"
    );
    lab.stop_all(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&dir);
}

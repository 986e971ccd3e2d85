//! atftp's RFC 2090 multicast client against `fleetboot files` in private namespaces: one
//! client, then a second that joins while the first transfer flows (it takes what is
//! flowing and, made master in turn, fetches the head it missed). Both files must be
//! byte-identical; the late join is checked from the file server's own records.

mod mcast_common;

use fleetboot_lab::gate::e2e_ready;
use fleetboot_lab::netns::Lab;
use mcast_common::*;
use std::time::Duration;

#[test]
fn atftp_rfc2090_multicast_with_a_late_joiner() {
    if !e2e_ready(
        "atftp_rfc2090_multicast_with_a_late_joiner",
        &["atftp", "timeout"],
    ) {
        return;
    }
    let dir = work_dir("mtftp-e2e");
    // 4 MiB: 8192 blocks of 512, lock-step, long enough for the second client to join mid-way.
    let data = random_bytes(2090, 4 << 20);
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
            "[server]\naddress = \"10.77.0.21\"\ninterface = \"eth0\"\nroot = \"{}\"\n[dhcp]\nmode = \"off\"\n\
             [files]\nrfc2090_port = 69\nrfc2090_groups = [\"239.255.209.1\", \"239.255.209.9\"]\nrecords = \"{}\"\n",
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
    let a1 = atftp(&lab, &c1.ns, &o1);
    // Join once the first transfer is flowing.
    let t0 = std::time::Instant::now();
    while !std::fs::metadata(&o1).is_ok_and(|m| m.len() > 256 * 1024)
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let a2 = atftp(&lab, &c2.ns, &o2);
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

//! The packaging files, checked without building the package (no root): every systemd
//! unit shares one sandbox and grants exactly the capabilities its role's ports and
//! sockets need, runs a subcommand that exists and takes --config, the shipped config is valid and answers no DHCP, and every asset the
//! package metadata names exists. `package_e2e.rs` builds, installs and runs it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn units() -> Vec<(String, String)> {
    let dir = workspace().join("packaging/systemd");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// The values of `key=` lines of a unit's text, comments excluded.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    text.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
}

#[test]
fn the_roles_each_have_a_unit() {
    let names: BTreeSet<String> = units().into_iter().map(|(n, _)| n).collect();
    let want: BTreeSet<String> = [
        "fleetboot.service",
        "fleetboot-negotiate@.service",
        "fleetboot-files@.service",
        "fleetboot-stream@.service",
        "fleetboot-nbd@.service",
        "fleetboot-cache@.service",
        "fleetboot-master@.service",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
}

#[test]
fn every_unit_has_the_same_sandbox() {
    let sandbox = [
        "User=fleetboot",
        "Group=fleetboot",
        "StateDirectory=fleetboot",
        "ReadWritePaths=/var/lib/fleetboot",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "LimitNOFILE=65536",
    ];
    for (name, text) in units() {
        for line in sandbox {
            assert!(text.lines().any(|l| l == line), "{name} lacks {line}");
        }
        // Only `fleetboot serve` re-reads its config on SIGHUP; the other roles would stop.
        let reload = values(&text, "ExecReload");
        if name == "fleetboot.service" {
            assert_eq!(reload.len(), 2, "{name}: check the config, then SIGHUP");
            assert!(reload[0].contains("check-config") && reload[1] == "/bin/kill -HUP $MAINPID", "{name}: {reload:?}");
        } else {
            assert!(reload.is_empty(), "{name}: SIGHUP would stop this role");
        }
        assert_eq!(values(&text, "WantedBy"), ["multi-user.target"], "{name}");
    }
}

#[test]
fn each_unit_grants_only_what_its_ports_and_sockets_need() {
    // serve: 67 and 69 (< 1024) and the raw ICMPv6 socket of router advertisements;
    // files: RFC 2090 on 69; every other role binds ports above 1023 only.
    for (name, text) in units() {
        let want = match name.as_str() {
            "fleetboot.service" => "CAP_NET_BIND_SERVICE CAP_NET_RAW",
            "fleetboot-files@.service" => "CAP_NET_BIND_SERVICE",
            _ => "",
        };
        assert_eq!(values(&text, "AmbientCapabilities"), [want], "{name}");
        assert_eq!(values(&text, "CapabilityBoundingSet"), [want], "{name}: the bounding set is the same, so nothing more can be gained");
        assert!(!text.lines().any(|l| !l.starts_with('#') && l.contains("CAP_NET_ADMIN")), "{name}");
    }
}

#[test]
fn each_unit_runs_a_subcommand_that_takes_its_config() {
    for (name, text) in units() {
        let exec = values(&text, "ExecStart");
        assert_eq!(exec.len(), 1, "{name}");
        let words: Vec<&str> = exec[0].split_whitespace().collect();
        assert_eq!(words[0], "/usr/bin/fleetboot", "{name}");
        let config_at = words.iter().position(|w| *w == "--config").unwrap_or_else(|| panic!("{name}: no --config"));
        let want_config = if name.contains('@') { "/etc/fleetboot/%i.toml" } else { "/etc/fleetboot/fleetboot.toml" };
        assert_eq!(words[config_at + 1], want_config, "{name}");
        assert_eq!(
            values(&text, "ExecStartPre"),
            [format!("/usr/bin/fleetboot check-config --config {want_config}").as_str()],
            "{name}: a bad config stops the start with its error"
        );
        let sub = &words[1..config_at];
        let help = Command::new(BIN).args(sub).arg("--help").output().unwrap();
        assert!(help.status.success(), "{name}: fleetboot {} does not exist", sub.join(" "));
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("--config"), "{name}: fleetboot {} takes no --config:\n{help}", sub.join(" "));
    }
}

#[test]
fn the_shipped_config_is_valid_and_answers_no_dhcp() {
    let path = workspace().join("packaging/fleetboot.toml");
    let out = Command::new(BIN).arg("check-config").arg("--config").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = fleetboot::config::Config::load(&path).unwrap();
    assert_eq!(config.dhcp.mode, fleetboot::config::DhcpMode::Off, "nothing answers DHCP until the operator says so");
    assert_eq!(config.data_dir, Path::new("/var/lib/fleetboot"), "the one directory the units may write");
    assert_eq!(config.root, Path::new("/srv/fleetboot"), "created by tmpfiles.d");
    assert!(!config.router_advertisement);
}

#[test]
fn every_asset_the_package_names_exists() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: toml::Value = toml::from_str(&std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap()).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let scripts = crate_dir.join(deb["maintainer-scripts"].as_str().unwrap());
    for s in ["postinst", "prerm", "postrm"] {
        let ok = Command::new("sh").arg("-n").arg(scripts.join(s)).status().unwrap();
        assert!(ok.success(), "{s} parses");
    }
    for asset in deb["assets"].as_array().unwrap() {
        let source = asset[0].as_str().unwrap();
        if source.starts_with("target/release/") {
            continue; // built by packaging/build-deb.sh
        }
        let (dir, pattern) = source.rsplit_once('/').unwrap();
        let found = std::fs::read_dir(crate_dir.join(dir)).unwrap().any(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            match pattern.split_once('*') {
                Some((pre, post)) => name.starts_with(pre) && name.ends_with(post),
                None => name == pattern,
            }
        });
        assert!(found, "asset {source} matches no file");
    }
}

//! Smoke runs of the bench scripts at a tiny size, so they cannot rot between the
//! runs that produce `docs/benchmarks.md`: each script must exit 0, print its table with a
//! row per server and client it was asked for, report the counts that say every transfer
//! was complete (byte-identical copies, booted clients, receivers with the image), and
//! leave no lab namespace behind. Times are printed by the scripts and never checked.
//!
//! The scripts run the binaries of this build (`FLEETBOOT_BIN`, `FLEETBOOT_STREAMD_BIN`,
//! `FLEETBOOT_LAB_BIN`: no release build inside a test) and build their topology with
//! `fleetboot-lab net up`. Needs root and the peers `scripts/setup.sh` installs; skips
//! otherwise unless `FLEETBOOT_REQUIRE_E2E=1`.

use fleetboot_lab::gate;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (the scripts `cd` there themselves).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The binaries the scripts run: this package's helper, and the workspace's `fleetboot`
/// and `fleetboot-streamd` built next to it (`cargo build --workspace`, which
/// `cargo nextest run --workspace` does first).
fn bins() -> [(&'static str, PathBuf); 3] {
    let lab = PathBuf::from(env!("CARGO_BIN_EXE_fleetboot-lab"));
    let dir = lab.parent().unwrap().to_path_buf();
    [
        ("FLEETBOOT_LAB_BIN", lab),
        ("FLEETBOOT_BIN", dir.join("fleetboot")),
        ("FLEETBOOT_STREAMD_BIN", dir.join("fleetboot-streamd")),
    ]
}

fn ready(test: &str, tools: &[&str]) -> bool {
    let mut all = vec!["ip", "ss", "nft", "timeout", "bc", "awk", "cmp", "sha256sum"];
    all.extend_from_slice(tools);
    let bins = bins();
    let missing: Vec<String> = bins
        .iter()
        .filter(|(_, p)| !p.is_file())
        .map(|(_, p)| p.display().to_string())
        .collect();
    let why = format!("not built: {} (cargo build --workspace --bins)", missing.join(", "));
    gate::e2e_ready_with(test, &all, &[(missing.is_empty(), why.as_str())])
}

/// Runs `scripts/NAME ARGS` with `env`, bounded; returns stdout after checking the exit
/// status and that the lab namespaces the script announced are gone. Output goes to files,
/// not pipes: a process the script left running cannot hold the test up.
fn run_script(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    run_script_within(name, args, env, 150)
}

/// [`run_script`] with a limit of its own (`secs`; nextest ends a test after 300 s).
fn run_script_within(name: &str, args: &[&str], env: &[(&str, &str)], secs: u64) -> String {
    let out_dir = std::env::temp_dir().join(format!("fleetboot-bench-smoke-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (out_path, err_path) = (out_dir.join("stdout"), out_dir.join("stderr"));
    let mut c = Command::new("timeout");
    c.args(["--kill-after=10", &secs.to_string()])
        .arg(repo().join("scripts").join(name))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in bins() {
        c.env(k, v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("running the script");
    let end = Instant::now() + Duration::from_secs(secs + 30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out_dir);
    eprintln!("{name} {args:?}:\n{stdout}");
    assert!(
        status.success(),
        "{name} failed ({status}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // bash reports these and goes on (inside $(...), or without set -e): still a broken script.
    for bash_error in ["unbound variable", "command not found", "syntax error", "bad substitution"] {
        assert!(!stderr.contains(bash_error), "{name}: {bash_error}:\n{stderr}");
    }
    // "bench: lab namespaces fbl123x0-* (removed on exit)"
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("bench: lab namespaces "))
        .and_then(|l| l.split("-*").next())
        .unwrap_or_else(|| panic!("{name} did not announce its lab:\n{stderr}"))
        .to_string();
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let left: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{id}-")))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "{name} left namespaces behind: {left:?}");
    stdout
}

/// The rows of the markdown table whose header row starts with `header`, split into cells.
fn table(out: &str, header: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = out.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(header))
        .unwrap_or_else(|| panic!("no table `{header}` in:\n{out}"));
    lines[start + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.parse::<f64>().is_ok()
}

#[test]
fn bench_tftp_smoke() {
    if !ready("bench_tftp_smoke", &["dnsmasq", "atftp", "curl"]) {
        return;
    }
    // BENCH_LOSSES=0: only the clean link (this once died at its summary line).
    let out = run_script(
        "bench-tftp.sh",
        &["1", "1"],
        &[("BENCH_SERVERS", "fleetboot dnsmasq"), ("BENCH_LOSSES", "0")],
    );
    let rows = table(&out, "| loss | client | fleetboot | dnsmasq |");
    let clients: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(clients, ["atftp", "curl", "atftp-w16"], "{out}");
    for r in &rows {
        assert_eq!(r[0], "0%", "{out}");
        // A number is a byte-identical copy; FAIL would be a broken one.
        assert!(is_number(&r[2]) && is_number(&r[3]), "row {r:?}:\n{out}");
    }
    assert!(out.contains("vs dnsmasq with lock-step atftp (clean): "), "{out}");
    assert!(!out.contains("(1% loss)"), "{out}");
    // BENCH_LOSSES=1: only the lossy link (nftables drop rule on the client's bridge port).
    let out = run_script(
        "bench-tftp.sh",
        &["1", "1", "1"],
        &[("BENCH_SERVERS", "fleetboot"), ("BENCH_LOSSES", "1")],
    );
    let rows = table(&out, "| loss | client | fleetboot |");
    assert_eq!(rows.len(), 3, "{out}");
    for r in &rows {
        assert_eq!(r[0], "1%", "{out}");
        assert!(is_number(&r[2]), "row {r:?}:\n{out}");
    }
}

#[test]
fn bench_dhcp_smoke() {
    if !ready("bench_dhcp_smoke", &["perfdhcp", "kea-dhcp4", "dnsmasq"]) {
        return;
    }
    // 1 s at 50 exchanges/s from 100 clients: well inside every server's capacity.
    let out = run_script(
        "bench-dhcp.sh",
        &["1", "50", "100", "1"],
        &[("BENCH_SERVERS", "fleetboot dnsmasq kea")],
    );
    let rows = table(&out, "| rate/s | fleetboot | dnsmasq | kea |");
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0][0], "50");
    for cell in &rows[0][1..] {
        // "1/1 clean; drops 0; ..."; "drops -" would be a perfdhcp run without output.
        assert!(!cell.contains("drops -"), "{cell}:\n{out}");
    }
    assert!(rows[0][1].starts_with("1/1 clean; drops 0;"), "fleetboot: {}:\n{out}", rows[0][1]);
    assert!(out.contains("highest rate with 0 drops in every run, fleetboot: 50/s"), "{out}");
}

#[test]
fn bench_failover_smoke() {
    if !ready("bench_failover_smoke", &["perfdhcp", "kea-dhcp4", "tcpdump", "python3", "psql"]) {
        return;
    }
    // One run at 50 new clients/s, the kill 1 s in, the tuned cells only (the default
    // Kea cell waits out a 60 s timeout).
    let out = run_script(
        "bench-failover.sh",
        &["1", "50", "1"],
        &[("BENCH_CELLS", "fleetboot-tuned kea-tuned")],
    );
    let rows = table(&out, "| setting |");
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["fleetboot-tuned", "kea-tuned"], "{out}");
    for row in &rows {
        // "1861 (median 1861)": the survivor ACKed a client of the dead server; "never"
        // would be a pair that did not fail over.
        let first = row[1].split_whitespace().next().unwrap_or("");
        assert!(is_number(first), "{}: no failover: {}:\n{out}", row[0], row[1]);
    }
    assert!(out.contains("kea-tuned ÷ fleetboot-tuned (median failover): "), "{out}");
}

#[test]
fn bench_storm_smoke() {
    if !ready("bench_storm_smoke", &["dnsmasq", "curl", "python3", "nginx"]) {
        return;
    }
    // A stand-in payload: the emulated clients fetch and hash bytes, they boot nothing.
    let payload = std::env::temp_dir().join(format!("fleetboot-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&payload).unwrap();
    std::fs::write(payload.join("vmlinuz"), vec![0x5a; 200_000]).unwrap();
    std::fs::write(payload.join("initrd.gz"), vec![0xa5; 50_000]).unwrap();
    let out = run_script(
        "bench-storm.sh",
        &["3", "1", "http tftp", "3", "1"],
        &[("FLEETBOOT_PAYLOAD", payload.to_str().unwrap())],
    );
    let _ = std::fs::remove_dir_all(&payload);
    let rows = table(&out, "| transport | setup |");
    let setups: Vec<(&str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(
        setups,
        [
            ("http", "fleetboot"),
            ("http", "dnsmasq + python3 http.server"),
            ("http", "dnsmasq + nginx"),
            ("tftp", "fleetboot"),
            ("tftp", "dnsmasq")
        ],
        "{out}"
    );
    for r in &rows {
        assert_eq!(r[4], "0 of 3", "failed clients, {r:?}:\n{out}");
        assert!(is_number(&r[2]) && is_number(&r[3]), "p50/p99 of {r:?}:\n{out}");
    }
    let par = table(&out, "| server | run | byte-identical |");
    assert_eq!(par.len(), 2, "{out}");
    for r in &par {
        assert_eq!(r[2], "3 of 3", "{r:?}:\n{out}");
    }
}

#[test]
fn bench_multicast_smoke() {
    if !ready(
        "bench_multicast_smoke",
        &["udp-sender", "udp-receiver", "uftp", "uftpd"],
    ) {
        return;
    }
    let out = run_script("bench-multicast.sh", &["1", "2", "100"], &[]);
    let rows = table(&out, "| loss on one link | tool |");
    let cells: Vec<(&str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(
        cells,
        [
            ("0%", "fleetboot-cold"),
            ("0%", "fleetboot"),
            ("0%", "udpcast"),
            ("0%", "uftp"),
            ("1%", "fleetboot-cold"),
            ("1%", "fleetboot"),
            ("1%", "udpcast"),
            ("1%", "uftp")
        ],
        "{out}"
    );
    for r in &rows {
        // fleetboot must deliver to every receiver; a peer tool that loses one under loss
        // (uftp did, once in a full run) is its own result, which the bench reports.
        if r[1].starts_with("fleetboot") {
            assert_eq!(r[2], "2/2", "receivers with the image (SHA-256), {r:?}:\n{out}");
        } else {
            assert!(r[2].ends_with("/2"), "receivers counted, {r:?}:\n{out}");
        }
        assert!(is_number(&r[5]) && is_number(&r[6]), "egress of {r:?}:\n{out}");
    }
}

/// With jumbo frames on every link, fleetboot streams 8192-byte blocks: a clean session's
/// egress in frames is below what any session at MTU 1500 can reach (its headers alone
/// are 1.043x the image).
#[test]
fn bench_multicast_jumbo_frames_smoke() {
    if !ready("bench_multicast_jumbo_frames_smoke", &["uftp", "uftpd"]) {
        return;
    }
    let env = [("BENCH_MTU", "9000"), ("BENCH_TOOLS", "fleetboot uftp"), ("BENCH_LOSSES", "0")];
    let out = run_script("bench-multicast.sh", &["2", "2", "100"], &env);
    assert!(out.contains("MTU 9000"), "{out}");
    let rows = table(&out, "| loss on one link | tool |");
    let fb = rows.iter().find(|r| r[1] == "fleetboot").unwrap_or_else(|| panic!("no fleetboot row:\n{out}"));
    assert_eq!(fb[2], "2/2", "receivers with the image (SHA-256), {fb:?}:\n{out}");
    let egress: f64 = fb[6].parse().unwrap_or_else(|_| panic!("egress of {fb:?}:\n{out}"));
    assert!(egress < 1.04, "egress {egress} x the image with 8192-byte blocks:\n{out}");
}

#[test]
fn bench_dashboard_smoke() {
    if !ready("bench_dashboard_smoke", &["python3", "getconf"]) {
        return;
    }
    let out = run_script("bench-dashboard.sh", &["20", "1"], &[("BENCH_STORM_SECS", "60"), ("BENCH_HOLD_SECS", "2"), ("BENCH_HOLD_PAIRS", "1")]);
    let rows = table(&out, "| run | viewer | clients booted |");
    let viewers: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(viewers, ["no", "yes"], "{out}");
    for r in &rows {
        assert_eq!(r[2], "20/20", "clients booted, {r:?}:\n{out}");
        assert!(is_number(&r[3]) && is_number(&r[4]), "CPU and wall time of {r:?}:\n{out}");
    }
    // The viewer saw rows arrive: latencies, and at least one update per client.
    let watched = &rows[1];
    assert!(watched[6..9].iter().all(|c| is_number(c)), "latencies {watched:?}:\n{out}");
    assert!(watched[9].parse::<u64>().is_ok_and(|n| n >= 20), "row updates {watched:?}:\n{out}");
    assert!(out.contains("run 1: watching added "), "{out}");
    // The quiet windows after each storm: one without and one with a viewer, each measured.
    let quiet = table(&out, "| after storm (run/viewer) | pair | viewer |");
    assert_eq!(quiet.iter().map(|r| r[2].as_str()).collect::<Vec<_>>(), ["no", "yes", "no", "yes"], "{out}");
    assert!(quiet.iter().all(|r| is_number(&r[3]) && is_number(&r[5])), "{out}");
    assert!(out.contains("a viewer costs "), "{out}");
}

#[test]
fn bench_moonshot_smoke() {
    if !ready("bench_moonshot_smoke", &["nbdcopy", "python3", "od"]) {
        return;
    }
    // 4 clients in 2 namespaces, a 1 MiB image, 20 Mbit/s, 1% loss towards one namespace.
    let out = run_script("bench-moonshot.sh", &["4", "2", "1", "20", "1"], &[]);
    let rows = table(&out, "| setup | clients |");
    let cells: Vec<(&str, &str)> = rows.iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(
        cells,
        [
            ("stream, clean", "1"),
            ("stream, clean", "4"),
            ("stream, 1% loss (lossy link)", "1"),
            ("stream, 1% loss on 1 of 2 links", "4"),
            ("http", "1"),
            ("http", "4"),
            ("nbd (nbdcopy)", "1"),
            ("nbd (nbdcopy)", "4")
        ],
        "{out}"
    );
    for r in &rows {
        assert_eq!(r[2], format!("{0}/{0}", r[1]), "clients with the image (SHA-256), {r:?}:\n{out}");
        assert!(is_number(&r[3]) && is_number(&r[4]), "time and egress of {r:?}:\n{out}");
    }
}

#[test]
fn profile_smoke() {
    // inferno: on PATH, or where scripts/profile.sh installs it (its install takes minutes,
    // more than this test may run).
    let inferno = repo().join("target/tools/bin/inferno-flamegraph");
    let on_path = Command::new("sh")
        .args(["-c", "command -v inferno-flamegraph"])
        .output()
        .is_ok_and(|o| o.status.success());
    let why = format!("no inferno-flamegraph on PATH or in {}", inferno.display());
    if !gate::e2e_ready_with(
        "profile_smoke",
        &["perf"],
        &[(inferno.is_file() || on_path, why.as_str())],
    ) || !ready("profile_smoke", &["perf", "perfdhcp", "kea-dhcp4", "dnsmasq", "python3"])
    {
        return;
    }
    // The DHCP path: fleetboot serve under perf while perfdhcp runs 1 s at 100 DORA/s.
    let out_dir = std::env::temp_dir().join(format!("fleetboot-profile-smoke-{}", std::process::id()));
    let out_str = out_dir.to_str().unwrap().to_string();
    run_script_within(
        "profile.sh",
        &["dhcp"],
        &[
            ("PROFILE_OUT", out_str.as_str()),
            ("PROFILE_SECS", "1"),
            ("PROFILE_DHCP_RATE", "100"),
            ("PROFILE_FREQ", "499"),
        ],
        // Resolving a debug build's inlined frames (perf script, addr2line) takes most
        // of it: ~130 s on a loaded machine.
        270,
    );
    let read = |name: &str| std::fs::read_to_string(out_dir.join(name)).unwrap_or_default();
    let (folded, svg, top, bench) =
        (read("dhcp.folded"), read("dhcp.svg"), read("dhcp.top"), read("dhcp.bench.txt"));
    let _ = std::fs::remove_dir_all(&out_dir);
    // The recorded process is fleetboot itself (the stacks start with its thread names)
    // and its own code was resolved: frames of fleetboot's crates, among them the DHCP
    // service's.
    let stacks: Vec<(&str, u64)> = folded
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(s, n)| (s, n.parse().unwrap_or(0)))
        .collect();
    assert!(!stacks.is_empty(), "no stacks:\n{bench}");
    let samples: u64 = stacks.iter().map(|(_, n)| n).sum();
    let in_fleetboot: u64 = stacks
        .iter()
        .filter(|(s, _)| s.split(';').any(|f| f.starts_with("fleetboot")))
        .map(|(_, n)| n)
        .sum();
    assert!(in_fleetboot * 2 > samples, "{in_fleetboot} of {samples} samples in fleetboot's code:\n{top}");
    assert!(
        stacks.iter().any(|(s, _)| s.contains("fleetboot_dhcp") || s.contains("serve::dhcp")),
        "no frame of the DHCP service:\n{top}"
    );
    assert!(svg.contains("<svg") && svg.contains("fleetboot"), "flame graph:\n{}", &svg[..svg.len().min(500)]);
    assert!(top.starts_with("weight: "), "{top}");
    // The bench script's own table came through: perfdhcp ran against the recorded server
    // ("drops -" would be a run without output). Drops are not checked: a debug build under
    // perf on a busy machine may drop some at any rate.
    assert!(
        bench.lines().any(|l| l.starts_with("| 100 | ") && !l.contains("drops -")),
        "{bench}"
    );
}

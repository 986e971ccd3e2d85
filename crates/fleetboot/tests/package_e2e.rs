//! The Debian package, built from this workspace by `packaging/build-deb.sh` (cargo-deb):
//! what it holds, and what installing it does — in a throwaway copy of this host's root
//! (an overlay in a private mount namespace, `tests/package/throwaway-root.sh`), never on
//! the host itself. There `dpkg -i` creates the `fleetboot` account and directories, every
//! unit passes `systemd-analyze verify`, the service account can read the config, and
//! `fleetboot.service` and `fleetboot-nbd@fleetboot.service` run under systemd (booted with
//! systemd-nspawn on that root, in a private network namespace): as `fleetboot`, with only
//! their capabilities, seccomp and a read-only root, serving HTTP, TFTP and a DHCP lease to
//! dhclient over a veth pair inside the container. Then `dpkg -r` and `dpkg -P`.

mod doctor_common;

use doctor_common::{TempDir, BIN};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn ready(test: &str, extra: &[&str]) -> bool {
    let mut tools = vec!["cargo-deb", "dpkg-deb", "gzip"];
    tools.extend_from_slice(extra);
    fleetboot_lab::gate::e2e_ready(test, &tools)
}

/// Packages the binary these tests run (target/debug/fleetboot, fast compression) into
/// `out`; the .deb's path. `--no-build`: a cargo build here could relink the binary other
/// tests are running.
fn build_deb(out: &Path) -> PathBuf {
    let bin = Path::new(BIN).canonicalize().unwrap();
    assert_eq!(bin.parent().unwrap().file_name().unwrap(), "debug", "{bin:?}");
    let mut cmd = Command::new(workspace().join("packaging/build-deb.sh"));
    cmd.args(["--profile", "dev", "--fast", "--no-build", "--output"]).arg(out);
    if let Some(target) = bin.parent().and_then(Path::parent) {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let run = fleetboot_lab::netns::output_with_timeout(cmd, Duration::from_secs(900)).expect("build-deb.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "build-deb.sh failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let deb = PathBuf::from(stdout.lines().last().expect("the .deb's path").trim());
    assert!(deb.is_file() && deb.extension().is_some_and(|e| e == "deb"), "{deb:?}");
    deb
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb").args(args).arg(deb).output().unwrap();
    assert!(out.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The man pages `fleetboot manual` writes for this binary: one per visible command.
fn expected_man_pages(dir: &Path) -> BTreeSet<String> {
    let ok = Command::new(BIN).arg("manual").arg("--out").arg(dir).status().unwrap();
    assert!(ok.success());
    std::fs::read_dir(dir.join("man1")).unwrap().map(|e| format!("{}.gz", e.unwrap().file_name().to_string_lossy())).collect()
}

#[test]
fn the_package_holds_the_binary_config_units_man_pages_and_completions() {
    if !ready("the_package_holds_the_binary_config_units_man_pages_and_completions", &[]) {
        return;
    }
    let dir = TempDir::new("deb-contents");
    let deb = build_deb(&dir.0.join("deb"));
    assert_eq!(dpkg_deb(&["-f"], &deb).lines().find(|l| l.starts_with("Package:")), Some("Package: fleetboot"));
    let depends = dpkg_deb(&["-f"], &deb).lines().find(|l| l.starts_with("Depends:")).map(str::to_string);
    assert!(depends.as_deref().is_some_and(|d| d.contains("libc6")), "shared-library dependencies computed: {depends:?}");
    let conffiles = dpkg_deb(&["-I"], &deb);
    assert!(conffiles.contains("conffiles") && conffiles.contains("postinst"), "{conffiles}");
    let conffiles = Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&conffiles.stdout).trim(), "/etc/fleetboot/fleetboot.toml");

    let listing = dpkg_deb(&["-c"], &deb);
    let files: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let mode_of = |path: &str| {
        listing.lines().find(|l| l.ends_with(&format!(".{path}"))).map(|l| l.split_whitespace().next().unwrap().to_string())
    };
    for f in [
        "/usr/bin/fleetboot",
        "/etc/fleetboot/fleetboot.toml",
        "/lib/systemd/system/fleetboot.service",
        "/lib/systemd/system/fleetboot-negotiate@.service",
        "/lib/systemd/system/fleetboot-files@.service",
        "/lib/systemd/system/fleetboot-stream@.service",
        "/lib/systemd/system/fleetboot-nbd@.service",
        "/lib/systemd/system/fleetboot-cache@.service",
        "/lib/systemd/system/fleetboot-master@.service",
        "/usr/lib/sysusers.d/fleetboot.conf",
        "/usr/lib/tmpfiles.d/fleetboot.conf",
        "/usr/share/bash-completion/completions/fleetboot",
        "/usr/share/zsh/vendor-completions/_fleetboot",
        "/usr/share/fish/vendor_completions.d/fleetboot.fish",
        "/usr/share/doc/fleetboot/copyright",
        "/usr/share/doc/fleetboot/examples/fleetboot.toml",
    ] {
        assert!(files.contains(f), "{f} is not in the package:\n{listing}");
    }
    assert_eq!(mode_of("/usr/bin/fleetboot").as_deref(), Some("-rwxr-xr-x"));
    let pages: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.strip_prefix("/usr/share/man/man1/"))
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    let want = expected_man_pages(&dir.0.join("manual"));
    assert_eq!(pages, want, "a compressed man page for every command the binary has");
    for page in ["fleetboot.1.gz", "fleetboot-serve.1.gz", "fleetboot-doctor.1.gz", "fleetboot-image-import.1.gz"] {
        assert!(pages.contains(page), "{page} missing: {pages:?}");
    }
    // The pages and completions are the binary's: the doctor page documents its options.
    let unpacked = dir.0.join("unpacked");
    let ok = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked).status().unwrap();
    assert!(ok.success());
    let page = Command::new("gzip").arg("-dc").arg(unpacked.join("usr/share/man/man1/fleetboot-doctor.1.gz")).output().unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("no\\-dhcp\\-probe") && page.contains("json"), "{page}");
    let bash = std::fs::read_to_string(unpacked.join("usr/share/bash-completion/completions/fleetboot")).unwrap();
    assert!(bash.contains("doctor") && bash.contains("serve"), "bash completion knows the subcommands");
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_package_installs_in_a_throwaway_root_and_its_units_run_under_systemd() {
    if !ready(
        "the_package_installs_in_a_throwaway_root_and_its_units_run_under_systemd",
        &["unshare", "chroot", "systemd-nspawn", "systemd-analyze", "dhclient", "curl", "ss"],
    ) {
        return;
    }
    let dir = TempDir::new("deb-install");
    let deb = build_deb(&dir.0.join("deb"));
    let out = dir.0.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--net", "--pid", "--fork", "--propagation", "private"])
        .arg(workspace().join("crates/fleetboot/tests/package/throwaway-root.sh"))
        .arg(&deb)
        .arg(&out);
    let run = fleetboot_lab::netns::output_with_timeout(cmd, Duration::from_secs(600)).expect("throwaway-root.sh");
    assert!(
        run.status.success() && out.join("finished").exists(),
        "throwaway-root.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );

    // The account and the files dpkg -i made.
    let passwd = read(&out, "passwd");
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!((fields[0], fields[5], fields[6]), ("fleetboot", "/var/lib/fleetboot", "/usr/sbin/nologin"), "{passwd}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system account: {passwd}");
    let stat = read(&out, "stat");
    for line in [
        "fleetboot:fleetboot 750 /var/lib/fleetboot",
        "root:fleetboot 640 /etc/fleetboot/fleetboot.toml",
        "root:root 755 /srv/fleetboot",
        "root:root 755 /usr/bin/fleetboot",
    ] {
        assert!(stat.lines().any(|l| l == line), "{line:?} not in:\n{stat}");
    }
    assert_eq!(read(&out, "man-doctor").trim(), "/usr/share/man/man1/fleetboot-doctor.1.gz");
    assert!(read(&out, "dpkg-install.log").contains("nothing is started"), "{}", read(&out, "dpkg-install.log"));

    // Every unit verifies clean: exit 0 and not a word on any stream.
    let verify = read(&out, "verify");
    assert_eq!(verify.lines().count(), 7, "{verify}");
    for line in verify.lines() {
        let v: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((v[1], v[2]), ("0", "0"), "systemd-analyze verify {}:\n{}", v[0], read(&out, &format!("verify-{}.log", v[0])));
    }
    let security = read(&out, "security-fleetboot.service.log");
    println!("{}", security.lines().last().unwrap_or_default());

    // The service account can read the config the package installed.
    assert_eq!(read(&out, "check-config-as-fleetboot.rc").trim(), "0", "{}", read(&out, "check-config-as-fleetboot.log"));
    // As installed, doctor says what must still be done: the placeholder address.
    assert_eq!(read(&out, "doctor.rc").trim(), "1");
    let doctor: serde_json::Value = serde_json::from_str(&read(&out, "doctor.json")).unwrap();
    let findings = doctor["findings"].as_array().unwrap();
    let has = |check: &str, status: &str, text: &str| {
        findings.iter().any(|f| f["check"] == check && f["status"] == status && f["summary"].as_str().unwrap().contains(text))
    };
    assert!(has("interface", "error", "server.address 192.0.2.1 is not an address of this host"), "{doctor:#}");
    assert!(has("data-dir", "ok", "/var/lib/fleetboot is writable by fleetboot"), "{doctor:#}");
    let elsewhere: serde_json::Value = serde_json::from_str(&read(&out, "doctor-elsewhere.json")).unwrap();
    assert!(
        elsewhere["findings"].as_array().unwrap().iter().any(|f| f["check"] == "data-dir"
            && f["status"] == "warning"
            && f["summary"].as_str().unwrap().contains("outside /var/lib/fleetboot")),
        "with the units installed, a data_dir they cannot write is flagged: {elsewhere:#}"
    );

    // Under systemd: both units ran, as fleetboot, sandboxed, and served.
    let booted = out.join("booted");
    assert!(booted.is_dir(), "the container never ran its checks:\n{}", read(&out, "console.log"));
    for (unit, caps) in [("fleetboot.service", "0000000000002400"), ("fleetboot-nbd@fleetboot.service", "0000000000000000")] {
        let show = read(&booted, &format!("show-{unit}"));
        let journal = read(&booted, &format!("journal-{unit}"));
        assert!(show.contains("ActiveState=active") && show.contains("NRestarts=0"), "{unit}:\n{show}\n{journal}");
        let status = read(&booted, &format!("status-{unit}"));
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).map(|v| v.split_whitespace().next().unwrap().to_string())
        };
        assert_eq!(field("Uid"), Some(uid.to_string()), "{unit} runs as fleetboot:\n{status}");
        // CAP_NET_BIND_SERVICE (10) and CAP_NET_RAW (13) for serve; nothing for NBD.
        assert_eq!(field("CapEff").as_deref(), Some(caps), "{unit}:\n{status}");
        assert_eq!(field("CapBnd").as_deref(), Some(caps), "{unit}:\n{status}");
        assert_eq!(field("NoNewPrivs").as_deref(), Some("1"), "{unit}:\n{status}");
        assert_eq!(field("Seccomp").as_deref(), Some("2"), "{unit}: a system call filter:\n{status}");
        let mounts = read(&booted, &format!("mounts-{unit}"));
        assert!(mounts.lines().any(|l| l.starts_with("/ ro")), "{unit}: read-only root:\n{mounts}");
        assert!(mounts.lines().any(|l| l.starts_with("/var/lib/fleetboot rw")), "{unit}: writable state:\n{mounts}");
    }
    let udp = read(&booted, "listening-udp");
    for port in ["%fb0:67 ", "%fb0:69 ", "%fb0:4011 "] {
        assert!(udp.lines().any(|l| l.contains(port) && l.contains("\"fleetboot\"")), "{port} in:\n{udp}");
    }
    assert!(read(&booted, "listening-tcp").contains(":10809"), "{}", read(&booted, "listening-tcp"));
    assert_eq!(read(&booted, "http.txt"), "hello-from-fleetboot\n");
    assert_eq!(read(&booted, "tftp.txt"), "hello-from-fleetboot\n");
    assert_eq!(read(&booted, "dhclient.rc").trim(), "0", "{}", read(&booted, "dhclient.log"));
    let leases: serde_json::Value = serde_json::from_str(&read(&booted, "leases.json")).unwrap();
    let leased = leases.as_array().unwrap();
    assert_eq!(leased.len(), 1, "{leases}");
    assert!(leased[0]["ip"].as_str().unwrap().starts_with("10.77.0.1"), "{leases}");
    let state = read(&booted, "state-dir");
    let db = state.lines().find(|l| l.ends_with(" fleetboot.db")).unwrap_or_else(|| panic!("no store:\n{state}"));
    assert!(db.contains(&format!(" {uid} {uid} ")), "the store belongs to fleetboot: {db}");

    // Remove keeps the config, purge removes it; the account and the state stay.
    assert_eq!(read(&out, "units-after-remove").trim(), "");
    assert_eq!(read(&out, "etc-after-remove").trim(), "fleetboot.toml");
    assert!(read(&out, "etc-after-purge").contains("No such file"), "{}", read(&out, "etc-after-purge"));
    assert!(read(&out, "passwd-after-purge").starts_with("fleetboot:"));
    assert_eq!(read(&out, "state-after-purge").trim(), "kept");
}

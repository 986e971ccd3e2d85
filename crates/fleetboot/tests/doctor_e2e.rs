//! `fleetboot doctor`'s network and filesystem checks, each against a broken setup built in
//! private namespaces (root): an interface that is down, an MTU too small for TFTP's
//! blocks, a server named as the clients' router without forwarding, another DHCP server
//! on the segment (dnsmasq in a second namespace: an error in server mode, what proxy mode
//! needs, a warning when it is gone; a rival boot server; fleetboot's own answers not
//! counted), port 67 held by dnsmasq on the same host, a read-only data_dir and one on a
//! nearly full filesystem (private mount namespaces). The DHCPDISCOVER only ever leaves
//! on the lab's bridge.

mod doctor_common;

use doctor_common::{current_user, run_in, Report, Setup, TempDir, BIN};
use fleetboot_lab::netns::{Lab, Proto};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn ready(test: &str) -> bool {
    fleetboot_lab::gate::e2e_ready(test, &["ip", "dnsmasq", "ss", "unshare", "mount"])
}

/// Doctor inside the lab's server namespace (srv0, 10.77.0.1/24).
fn doctor(lab: &Lab, config: &Path, args: &[&str]) -> Report {
    let mut all = vec!["--service-user", "root"];
    all.extend_from_slice(args);
    run_in(lab.cmd(lab.server_ns(), BIN), config, &all)
}

fn lab_setup(dir: &TempDir) -> Setup {
    let mut s = Setup::new(&dir.0);
    s.address = "10.77.0.1".into();
    s.interface = Some("srv0".into());
    s
}

fn server_mode(s: &mut Setup, router: &str) {
    s.mode = "server".into();
    s.subnet = Some(format!(
        "network = \"10.77.0.0/24\"\nrange = [\"10.77.0.100\", \"10.77.0.149\"]\nrouter = \"{router}\""
    ));
}

/// dnsmasq handing out 10.77.0.150-199 in `ns` on `ifname`, optionally with a boot file.
fn start_dnsmasq(lab: &mut Lab, dir: &Path, ns: &str, ifname: &str, boot_file: Option<&str>) -> u32 {
    let conf = dir.join(format!("dnsmasq-{ns}.conf"));
    let boot = boot_file.map(|b| format!("dhcp-boot={b}\n")).unwrap_or_default();
    std::fs::write(
        &conf,
        format!(
            "port=0\ninterface={ifname}\nbind-interfaces\nlog-dhcp\nlog-facility={}\ndhcp-leasefile={}\n\
             dhcp-range=10.77.0.150,10.77.0.199,255.255.255.0,1h\nno-ping\n{boot}",
            dir.join(format!("dnsmasq-{ns}.log")).display(),
            dir.join(format!("dnsmasq-{ns}.leases")).display()
        ),
    )
    .unwrap();
    let mut cmd = lab.cmd(ns, "timeout");
    cmd.arg("120")
        .arg("dnsmasq")
        .arg("--no-daemon")
        .arg(format!("--conf-file={}", conf.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid = lab.spawn("dnsmasq", cmd).unwrap();
    lab.wait_listening(ns, Proto::Udp, 67, Duration::from_secs(20)).expect("dnsmasq listening");
    pid
}

#[test]
fn an_interface_down_or_with_a_small_mtu() {
    if !ready("an_interface_down_or_with_a_small_mtu") {
        return;
    }
    let lab = Lab::new().unwrap();
    let dir = TempDir::new("iface-e2e");
    let ns = lab.server_ns().to_string();
    let mut s = lab_setup(&dir);
    let r = doctor(&lab, &s.write(), &[]);
    r.assert_clean();
    r.expect("interface", "ok", "srv0 has server.address 10.77.0.1");
    assert!(r.with("interface", "warning").is_empty(), "MTU 1500 fits 1468-byte blocks:\n{}", r.stdout);

    lab.exec(&ns, &["ip", "link", "set", "srv0", "mtu", "1400"], Duration::from_secs(10)).unwrap();
    let r = doctor(&lab, &s.write(), &[]);
    let f = r.expect("interface", "warning", "srv0's MTU is 1400");
    assert_eq!(f.fix.as_deref(), Some("set tftp.max_blksize = 1368"));

    lab.exec(&ns, &["ip", "link", "add", "dn0", "type", "veth", "peer", "name", "dn1"], Duration::from_secs(10)).unwrap();
    lab.exec(&ns, &["ip", "addr", "add", "10.78.0.1/24", "dev", "dn0"], Duration::from_secs(10)).unwrap();
    s.interface = Some("dn0".into());
    s.address = "10.78.0.1".into();
    let r = doctor(&lab, &s.write(), &[]);
    let f = r.expect("interface", "error", "dn0 is down");
    assert!(f.fix.as_deref().unwrap().starts_with("ip link set dn0 up"), "{f:?}");
    r.expect("interface", "ok", "dn0 has server.address 10.78.0.1");
    // The address on another interface than the one named.
    s.address = "10.77.0.1".into();
    let r = doctor(&lab, &s.write(), &[]);
    r.expect("interface", "error", "dn0 does not have server.address 10.77.0.1 (it has: 10.78.0.1); 10.77.0.1 is on srv0");
}

#[test]
fn a_router_that_does_not_forward() {
    if !ready("a_router_that_does_not_forward") {
        return;
    }
    let lab = Lab::new().unwrap();
    let dir = TempDir::new("forward-e2e");
    let mut s = lab_setup(&dir);
    server_mode(&mut s, "10.77.0.1");
    let config = s.write();
    let ns = lab.server_ns().to_string();
    lab.exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"], Duration::from_secs(10)).unwrap();
    let r = doctor(&lab, &config, &["--no-dhcp-probe"]);
    r.expect("network", "warning", "names this server (10.77.0.1) as the clients' router, but net.ipv4.ip_forward = 0");
    lab.exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"], Duration::from_secs(10)).unwrap();
    let r = doctor(&lab, &config, &["--no-dhcp-probe"]);
    assert!(r.with("network", "warning").iter().all(|f| !f.summary.contains("ip_forward")), "{}", r.stdout);
    // A subnet whose router is elsewhere: nothing to say, whatever forwarding is.
    lab.exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"], Duration::from_secs(10)).unwrap();
    server_mode(&mut s, "10.77.0.254");
    let r = doctor(&lab, &s.write(), &["--no-dhcp-probe"]);
    assert!(r.with("network", "warning").iter().all(|f| !f.summary.contains("ip_forward")), "{}", r.stdout);
}

#[test]
fn another_dhcp_server_on_the_segment() {
    if !ready("another_dhcp_server_on_the_segment") {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let dir = TempDir::new("rival-e2e");
    let other = lab.add_client(Some("10.77.0.2/24")).unwrap();
    let pid = start_dnsmasq(&mut lab, &dir.0, &other.ns, &other.ifname, Some("pxelinux.0"));
    let mut s = lab_setup(&dir);
    server_mode(&mut s, "10.77.0.1");
    let probe = ["--probe-wait", "5"];

    let r = doctor(&lab, &s.write(), &probe);
    let f = r.expect("dhcp-servers", "error", "another DHCP server answers on srv0: 10.77.0.2 offered 10.77.0.1");
    assert!(f.fix.as_deref().unwrap().contains("dhcp.mode = \"proxy\""), "{f:?}");
    r.expect("dhcp-servers", "warning", "another server hands boot information to PXE clients on srv0: 10.77.0.2");

    s.mode = "proxy".into();
    s.subnet = None;
    let r = doctor(&lab, &s.write(), &probe);
    r.expect("dhcp-servers", "ok", "10.77.0.2 offered 10.77.0.1");
    r.expect("dhcp-servers", "ok", "hands out addresses on srv0; fleetboot adds boot information as ProxyDHCP");

    lab.stop(pid, Duration::from_secs(5));
    let r = doctor(&lab, &s.write(), &probe);
    let f = r.expect("dhcp-servers", "warning", "no DHCP server answered a DHCPDISCOVER from");
    assert!(f.fix.as_deref().unwrap().contains("dhcp.mode = \"server\""), "{f:?}");
    assert!(r.exit_ok, "a warning only:\n{}", r.stdout);

    // fleetboot itself running on this host: its own offers and ports are not a problem.
    server_mode(&mut s, "10.77.0.1");
    let config = s.write();
    let mut serve = lab.cmd(lab.server_ns(), "timeout");
    serve.arg("120").arg(BIN).arg("serve").arg("--config").arg(&config).stdin(Stdio::null()).stdout(Stdio::null());
    serve.stderr(std::fs::File::create(dir.0.join("serve.log")).unwrap());
    let serve_pid = lab.spawn("fleetboot serve", serve).unwrap();
    let ns = lab.server_ns().to_string();
    lab.wait_listening(&ns, Proto::Udp, 67, Duration::from_secs(30)).expect("fleetboot serve listening");
    let r = doctor(&lab, &config, &probe);
    r.assert_clean();
    r.expect("dhcp-servers", "ok", "no other DHCP server answered");
    r.expect("dhcp-servers", "ok", "(fleetboot itself answered too)");
    r.expect("port", "ok", "67/udp (DHCP, dhcp.port) is in use by fleetboot");
    lab.stop(serve_pid, Duration::from_secs(5));
}

#[test]
fn port_67_held_by_dnsmasq_on_the_same_host() {
    if !ready("port_67_held_by_dnsmasq_on_the_same_host") {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let dir = TempDir::new("port67-e2e");
    let ns = lab.server_ns().to_string();
    start_dnsmasq(&mut lab, &dir.0, &ns, "srv0", None);
    let mut s = lab_setup(&dir);
    server_mode(&mut s, "10.77.0.254");
    let r = doctor(&lab, &s.write(), &["--no-dhcp-probe"]);
    let f = r
        .findings
        .iter()
        .find(|f| f.check == "port" && f.status == "error" && f.summary.starts_with("67/udp"))
        .unwrap_or_else(|| panic!("no error for port 67:\n{}", r.stdout));
    assert!(f.summary.contains("dnsmasq (pid "), "names the holder: {f:?}");
}

/// `unshare -m` with `mounts` done first, then doctor.
fn doctor_with_mounts(mounts: &str, config: &Path) -> Report {
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("set -e; {mounts}; exec \"$0\" \"$@\""))
        .arg(BIN);
    run_in(cmd, config, &["--no-dhcp-probe", "--service-user", &current_user()])
}

#[test]
fn a_read_only_or_nearly_full_data_dir() {
    if !ready("a_read_only_or_nearly_full_data_dir") {
        return;
    }
    let dir = TempDir::new("fs-e2e");
    let s = Setup::new(&dir.0);
    std::fs::create_dir_all(&s.data_dir).unwrap();
    let config = s.write();
    let data = s.data_dir.display().to_string();

    let r = doctor_with_mounts(&format!("mount --bind {data} {data}; mount -o remount,bind,ro {data}"), &config);
    let f = r.expect("data-dir", "error", "Read-only file system");
    assert!(f.fix.as_deref().unwrap().contains("read-only filesystem"), "{f:?}");

    let r = doctor_with_mounts(&format!("mount -t tmpfs -o size=40m tmpfs {data}"), &config);
    let f = r.expect("disk-space", "error", "MiB free of 40 MiB");
    assert!(f.fix.is_some());
    r.expect("data-dir", "ok", "is writable");

    let r = doctor_with_mounts(&format!("mount -t tmpfs -o size=600m tmpfs {data}"), &config);
    r.expect("disk-space", "warning", "MiB free of 600 MiB");
    r.assert_clean();
}

//! End to end: the DHCP clients operating systems run — dhcpcd, busybox udhcpc and
//! systemd-networkd — each get a lease from `fleetboot serve`, renew it and release it,
//! inside private network namespaces (as `real_clients.rs` does with dhclient).
//!
//! None of them may touch the host: every client runs in its own namespace, with its
//! state directories (`/run`, dhcpcd's database) bind-mounted from the test directory in
//! a private mount namespace, and with hooks that only configure the client's namespace
//! (`-c /bin/true` for dhcpcd, a logging script for udhcpc, `UseDNS=no` for networkd).
//!
//! Needs root and the tools (scripts/setup.sh: dhcpcd-base, busybox-static, systemd);
//! without them each test prints why and passes, unless FLEETBOOT_REQUIRE_E2E=1.
//! Assertions are about addresses, leases and the server's trace, never about time.

mod common;

use common::{e2e_ready, Env};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

fn in_range(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[..3] == [10, 77, 0] && (100..=199).contains(&o[3])
}

/// The lease of `mac` listed by `/api/leases`, if any.
fn lease_of_mac(env: &mut Env, mac: &str) -> Option<(Ipv4Addr, u64)> {
    env.leases().into_iter().find_map(|l| {
        if l["mac"].as_str() != Some(mac) {
            return None;
        }
        Some((l["ip"].as_str()?.parse().ok()?, l["expires_at"].as_u64()?))
    })
}

/// Waits (bounded, `secs`) until `check` holds; panics with `what` and the server log.
fn wait_for<T>(env: &mut Env, secs: u64, what: &str, mut check: impl FnMut(&mut Env) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check(env) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{what} within {secs} s\n--- server log ---\n{}", env.log_tail());
        }
        thread::sleep(Duration::from_millis(300));
    }
}

fn count(kinds: &[String], kind: &str) -> usize {
    kinds.iter().filter(|k| *k == kind).count()
}

/// The client's address on eth0 inside its namespace.
fn addr_in_ns(env: &Env, ns: &str) -> Option<Ipv4Addr> {
    let out = env.lab.exec(ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"], Duration::from_secs(10)).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
}

/// A shell wrapper that gives the client private state directories from the test
/// directory (bind mounts in the mount namespace `ip netns exec` made for it) and then runs
/// the client. `setup` adds lines before the `exec`.
fn wrapper(dir: &Path, name: &str, setup: &str) -> PathBuf {
    let state = dir.join(format!("{name}-state"));
    fs::create_dir_all(state.join("run")).unwrap();
    fs::create_dir_all(state.join("lib")).unwrap();
    let path = dir.join(format!("{name}-wrap.sh"));
    fs::write(
        &path,
        format!(
            "set -e\nmount --bind {run} /run\n{setup}\nexec \"$@\"\n",
            run = state.join("run").display(),
        ),
    )
    .unwrap();
    path
}

/// The pid of the process named `comm` in namespace `ns` (started by this test).
fn pid_in_ns(env: &Env, ns: &str, comm: &str) -> Option<i32> {
    let _ = env;
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "pids", ns]);
    let out = fleetboot_lab::netns::output_with_timeout(c, Duration::from_secs(10)).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (found in its own namespace).
    unsafe { libc::kill(pid, sig) };
}

#[test]
fn udhcpc_lease_renew_release() {
    if !e2e_ready("udhcpc_lease_renew_release", &["busybox"]) {
        return;
    }
    let mut env = Env::new("udhcpc");
    env.start_server();
    let mac = "52:54:00:77:04:01";
    let c = env.add_client(None, Some(mac));
    // udhcpc's script only logs and configures the client's own namespace.
    let events = env.dir.join("udhcpc.events");
    let script = env.dir.join("udhcpc.script");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 ${{ip:-}}\" >> {events}\ncase \"$1\" in\n\
             bound|renew) ip addr replace \"$ip/${{mask:-24}}\" brd + dev \"$interface\" ;;\n\
             deconfig) ip -4 addr flush dev \"$interface\" ;;\nesac\nexit 0\n",
            events = events.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pidfile = env.dir.join("udhcpc.pid");
    let mut cmd = env.lab.cmd(&c.ns, "timeout");
    cmd.args(["120", "busybox", "udhcpc", "-f", "-i", "eth0", "-t", "10", "-T", "2", "-s"])
        .arg(&script)
        .arg("-p")
        .arg(&pidfile)
        .stdout(fs::File::create(env.dir.join("udhcpc.out")).unwrap())
        .stderr(fs::File::create(env.dir.join("udhcpc.err")).unwrap());
    let spawned = env.lab.spawn("udhcpc", cmd).expect("starting udhcpc");
    let logged = |what: &str| fs::read_to_string(&events).unwrap_or_default().lines().filter(|l| l.starts_with(what)).count();

    let (ip, expiry) = wait_for(&mut env, 60, "udhcpc got no lease", |e| {
        (logged("bound") > 0).then(|| lease_of_mac(e, mac)).flatten()
    });
    assert!(in_range(ip), "leased {ip}");
    assert_eq!(addr_in_ns(&env, &c.ns), Some(ip), "udhcpc's script did not configure {ip}");
    let pid: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();

    // SIGUSR1: renew (a unicast REQUEST for the address it holds).
    thread::sleep(Duration::from_millis(1100)); // expiry is in seconds: let it move
    signal(pid, libc::SIGUSR1);
    wait_for(&mut env, 30, "udhcpc did not renew", |_| (logged("renew") > 0).then_some(()));
    let (ip2, expiry2) = lease_of_mac(&mut env, mac).expect("lease gone after renew");
    assert_eq!(ip2, ip, "renew changed the address");
    assert!(expiry2 > expiry, "renew did not extend the lease: {expiry} -> {expiry2}");

    // SIGUSR2: release.
    signal(pid, libc::SIGUSR2);
    wait_for(&mut env, 30, "the lease is still listed after udhcpc's release", |e| lease_of_mac(e, mac).is_none().then_some(()));
    let kinds = wait_for(&mut env, 30, "no DHCPRELEASE in the trace", |e| {
        let k = e.trace_kinds(mac);
        k.iter().any(|x| x == "DHCPRELEASE").then_some(k)
    });
    assert!(count(&kinds, "DHCPREQUEST") >= 2 && count(&kinds, "DHCPACK") >= 2, "{kinds:?}");
    env.lab.stop(spawned, Duration::from_secs(5));
}

#[test]
fn dhcpcd_lease_renew_release() {
    if !e2e_ready("dhcpcd_lease_renew_release", &["dhcpcd"]) {
        return;
    }
    let mut env = Env::new("dhcpcd");
    env.start_server();
    let mac = "52:54:00:77:04:02";
    let c = env.add_client(None, Some(mac));
    // dhcpcd keeps its control sockets in /run/dhcpcd and its DUID in /var/lib/dhcpcd.
    let lib = env.dir.join("dhcpcd-state/lib");
    let wrap = wrapper(&env.dir.path, "dhcpcd", &format!("mkdir -p /run/dhcpcd\nmount --bind {} /var/lib/dhcpcd", lib.display()));
    let wrap_s = wrap.display().to_string();
    let mut cmd = env.lab.cmd(&c.ns, "timeout");
    cmd.args(["120", "sh", &wrap_s, "dhcpcd", "-B", "-4", "-L", "-c", "/bin/true", "eth0"])
        .stdout(fs::File::create(env.dir.join("dhcpcd.out")).unwrap())
        .stderr(fs::File::create(env.dir.join("dhcpcd.err")).unwrap());
    let spawned = env.lab.spawn("dhcpcd", cmd).expect("starting dhcpcd");

    // dhcpcd probes the address with ARP before it takes it.
    let (ip, expiry) = wait_for(&mut env, 60, "dhcpcd did not configure a lease", |e| {
        let (ip, exp) = lease_of_mac(e, mac)?;
        (addr_in_ns(e, &c.ns) == Some(ip)).then_some((ip, exp))
    });
    assert!(in_range(ip), "leased {ip}");

    thread::sleep(Duration::from_millis(1100));
    let ns = c.ns.clone();
    env.run_ok(&ns, &["sh", &wrap_s, "dhcpcd", "-4", "-N", "eth0"], 30);
    let (ip2, _) = wait_for(&mut env, 30, "dhcpcd's renewal did not extend the lease", |e| {
        lease_of_mac(e, mac).filter(|(_, exp)| *exp > expiry)
    });
    assert_eq!(ip2, ip, "renew changed the address");

    env.run_ok(&ns, &["sh", &wrap_s, "dhcpcd", "-4", "-k", "eth0"], 30);
    wait_for(&mut env, 30, "the lease is still listed after dhcpcd -k", |e| lease_of_mac(e, mac).is_none().then_some(()));
    let kinds = wait_for(&mut env, 30, "no DHCPRELEASE in the trace", |e| {
        let k = e.trace_kinds(mac);
        k.iter().any(|x| x == "DHCPRELEASE").then_some(k)
    });
    assert!(count(&kinds, "DHCPREQUEST") >= 2 && count(&kinds, "DHCPACK") >= 2, "{kinds:?}");
    assert_eq!(addr_in_ns(&env, &c.ns), None, "dhcpcd kept the address after releasing it");
    env.lab.stop(spawned, Duration::from_secs(5));
}

const NETWORKD: [&str; 2] = ["/lib/systemd/systemd-networkd", "/usr/lib/systemd/systemd-networkd"];

#[test]
fn systemd_networkd_lease_renew_release() {
    let networkd = NETWORKD.iter().find(|p| Path::new(p).is_file());
    if !e2e_ready("systemd_networkd_lease_renew_release", &[]) {
        return;
    }
    let Some(networkd) = networkd else {
        let msg = "systemd_networkd_lease_renew_release: systemd-networkd is not installed";
        assert!(!fleetboot_lab::gate::required(), "{msg}");
        eprintln!("{msg}; skipped");
        return;
    };
    let mut env = Env::new("networkd");
    // networkd renews at T1, half the lease: the shortest lease the config allows.
    let text = fs::read_to_string(&env.config).unwrap().replace("lease_time = 3600", "lease_time = 60");
    fs::write(&env.config, text).unwrap();
    env.start_server();
    let mac = "52:54:00:77:04:03";
    let c = env.add_client(None, Some(mac));
    // /sys read-only in its mount namespace tells networkd there is no udev to wait for.
    let setup = "mount -o remount,ro /sys\nmkdir -p /run/systemd/network /run/systemd/netif\n\
                 chown systemd-network: /run/systemd/netif 2>/dev/null || true\n\
                 printf '[Match]\\nName=eth0\\n\\n[Network]\\nDHCP=ipv4\\nLinkLocalAddressing=no\\nIPv6AcceptRA=no\\n\\n\
                 [DHCPv4]\\nSendRelease=yes\\nUseDNS=no\\nUseNTP=no\\nUseRoutes=no\\nUseHostname=no\\n' \
                 > /run/systemd/network/10-eth0.network";
    let wrap = wrapper(&env.dir.path, "networkd", setup);
    let mut cmd = env.lab.cmd(&c.ns, "timeout");
    cmd.args(["150", "sh"])
        .arg(&wrap)
        .arg(networkd)
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .stdout(fs::File::create(env.dir.join("networkd.out")).unwrap())
        .stderr(fs::File::create(env.dir.join("networkd.err")).unwrap());
    let spawned = env.lab.spawn("systemd-networkd", cmd).expect("starting systemd-networkd");

    let (ip, expiry) = wait_for(&mut env, 60, "systemd-networkd did not configure a lease", |e| {
        let (ip, exp) = lease_of_mac(e, mac)?;
        (addr_in_ns(e, &c.ns) == Some(ip)).then_some((ip, exp))
    });
    assert!(in_range(ip), "leased {ip}");
    // Its own renewal at T1 (~30 s into the 60 s lease).
    let (ip2, _) = wait_for(&mut env, 90, "systemd-networkd did not renew at T1", |e| {
        lease_of_mac(e, mac).filter(|(_, exp)| *exp > expiry)
    });
    assert_eq!(ip2, ip, "renew changed the address");

    // SIGTERM: networkd stops its DHCP client, which sends a RELEASE (SendRelease=yes).
    let pid = pid_in_ns(&env, &c.ns, "systemd-network").expect("systemd-networkd is not running");
    signal(pid, libc::SIGTERM);
    wait_for(&mut env, 30, "the lease is still listed after networkd stopped", |e| lease_of_mac(e, mac).is_none().then_some(()));
    let kinds = wait_for(&mut env, 30, "no DHCPRELEASE in the trace", |e| {
        let k = e.trace_kinds(mac);
        k.iter().any(|x| x == "DHCPRELEASE").then_some(k)
    });
    assert!(count(&kinds, "DHCPREQUEST") >= 2 && count(&kinds, "DHCPACK") >= 2, "{kinds:?}");
    env.lab.stop(spawned, Duration::from_secs(5));
}

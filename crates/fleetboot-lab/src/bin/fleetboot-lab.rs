//! `fleetboot-lab net up`: a lab topology ([`fleetboot_lab::netns::Lab`]) for shell
//! scripts — the bench scripts build their namespaces, bridge and veths with it instead of
//! by hand, and get its cleanup.
//!
//! It creates the switch and server namespaces and one client namespace per `--client`,
//! prints their names as `KEY=VALUE` lines (ending with `LAB_READY=1`) on stdout, and then
//! holds the topology while the process it watches lives (`--while-alive PID`, by default
//! its parent). When that process exits — normally, on error, or killed with SIGKILL — or
//! this one gets SIGINT/SIGTERM/SIGHUP, it stops every process still running inside the
//! lab's namespaces and deletes them. Run as root.

use std::io::Write;

use anyhow::{bail, Context, Result};
use fleetboot_lab::netns::{self, Lab, BRIDGE, CLIENT_IF, SERVER_IF};

const USAGE: &str = "\
usage: fleetboot-lab net up [--server CIDR] [--multicast] [--client CIDR|none]... [--while-alive PID]

Builds a lab topology in private network namespaces and holds it while PID (default: the
parent process) lives; SIGINT/SIGTERM/SIGHUP tear it down at once. Prints, then blocks:
  LAB_ID=<prefix of every name>    LAB_SWITCH=<namespace with the bridge br0>
  LAB_SERVER=<server namespace>    LAB_SERVER_IF=srv0 (at --server, default 10.77.0.1/24)
  LAB_CLIENTn=<client namespace n> LAB_PORTn=<its port on the bridge, in LAB_SWITCH>
  LAB_CLIENT_IF=eth0 (every client's interface)                LAB_READY=1
--client CIDR gives that client an address (and a 224.0.0.0/4 route); --client none
leaves it without one (for DHCP clients). --multicast routes 224.0.0.0/4 via srv0 in the
server namespace. On teardown every process still inside the namespaces is stopped.";

struct NetUp {
    server: String,
    multicast: bool,
    clients: Vec<Option<String>>,
    while_alive: Option<i32>,
}

fn parse(args: &[String]) -> Result<NetUp> {
    let mut up = NetUp {
        server: format!("{}/24", netns::SERVER_ADDR),
        multicast: false,
        clients: Vec::new(),
        while_alive: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs {what}"))
        };
        match a.as_str() {
            "--server" => up.server = cidr(&value("an address/prefix")?)?,
            "--multicast" => up.multicast = true,
            "--client" => {
                let v = value("an address/prefix or `none`")?;
                up.clients.push(if v == "none" { None } else { Some(cidr(&v)?) });
            }
            "--while-alive" => {
                let v = value("a process id")?;
                let pid = v
                    .parse::<i32>()
                    .ok()
                    .filter(|p| *p > 1)
                    .with_context(|| format!("--while-alive: {v:?} is not a process id"))?;
                up.while_alive = Some(pid);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(up)
}

/// `a.b.c.d/len`, checked before it reaches `ip`.
fn cidr(s: &str) -> Result<String> {
    let ok = s.split_once('/').is_some_and(|(a, l)| {
        a.parse::<std::net::Ipv4Addr>().is_ok() && l.parse::<u8>().is_ok_and(|l| (1..=32).contains(&l))
    });
    if !ok {
        bail!("{s:?} is not an IPv4 address with a prefix length (like 10.78.0.1/24)");
    }
    Ok(s.to_string())
}

/// A descriptor that becomes readable when `pid` exits (pidfd_open(2)).
fn pidfd(pid: i32) -> Result<libc::c_int> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        bail!(
            "watching process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(fd as libc::c_int)
}

/// Blocks until the process behind `fd` exits.
fn wait_exit(fd: libc::c_int) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

fn net_up(up: NetUp) -> Result<()> {
    // Watch first: a topology whose owner is already gone must not be built at all.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let watched = up.while_alive.unwrap_or(parent);
    let fd = pidfd(watched)?;
    // SAFETY: as above.
    if up.while_alive.is_none() && unsafe { libc::getppid() } != parent {
        bail!("the parent process exited before the lab was built");
    }
    let mut lab = Lab::with_server_addr(&up.server)?;
    lab.set_stop_processes_inside(true);
    if up.multicast {
        netns::ip(&["-n", lab.server_ns(), "route", "add", "224.0.0.0/4", "dev", SERVER_IF])?;
    }
    let mut out = String::new();
    out += &format!("LAB_ID={}\n", lab.id());
    out += &format!("LAB_SWITCH={}\nLAB_BRIDGE={BRIDGE}\n", lab.switch_ns());
    out += &format!("LAB_SERVER={}\nLAB_SERVER_IF={SERVER_IF}\n", lab.server_ns());
    out += &format!("LAB_CLIENT_IF={CLIENT_IF}\n");
    for (i, addr) in up.clients.iter().enumerate() {
        let c = lab.add_client(addr.as_deref())?;
        out += &format!("LAB_CLIENT{i}={}\nLAB_PORT{i}={}\n", c.ns, c.switch_port);
    }
    out += "LAB_READY=1\n";
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    drop(stdout);
    eprintln!(
        "fleetboot-lab: lab {} up; held while process {watched} lives",
        lab.id()
    );
    wait_exit(fd);
    // Dropping the lab stops what runs inside and deletes the namespaces. A signal does the
    // same from the lab's signal thread, which then exits the process (a drop waits for it).
    drop(lab);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("net") if args.get(1).map(String::as_str) == Some("up") => {
            parse(&args[2..]).and_then(net_up)
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("fleetboot-lab: {e:#}");
        std::process::exit(1);
    }
}

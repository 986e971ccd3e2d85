//! Lab topology in private network namespaces.
//!
//! ```text
//!   <id>-srv            <id>-sw (switch)                 <id>-c0 ...
//!   srv0 10.77.0.1/24 ── sw-srv ─┐                ┌─ sw-c0 ── eth0 [address optional]
//!        fd77::1/64              br0 (stp 0, fd 0) ┤
//!                        tap0 ───┘ (one per VM)    └─ ...
//! ```
//!
//! Every veth pair is created from inside the switch namespace with its peer moved straight
//! into the target namespace, so nothing ever appears in the default namespace. Names carry
//! the process id and a counter, so concurrent runs never collide. Dropping a [`Lab`] kills
//! the processes it started (by pid) and deletes its namespaces (which removes their links);
//! [`install_signal_cleanup`] does the same for every live lab on SIGINT/SIGTERM. An owner
//! that starts processes in the namespaces itself ([`Lab::set_stop_processes_inside`], the
//! bench scripts through `fleetboot-lab net up`) has those stopped too. The server's address
//! is 10.77.0.1/24 unless [`Lab::with_server_addr`] says otherwise.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
/// The server's interface (in the server namespace).
pub const SERVER_IF: &str = "srv0";
/// The server's IPv4 address.
pub const SERVER_ADDR: &str = "10.77.0.1";
/// The lab subnet.
pub const SUBNET: &str = "10.77.0.0/24";
/// The server's IPv6 address (for router advertisements).
pub const SERVER_ADDR6: &str = "fd77::1";
/// Interface name inside client namespaces.
pub const CLIENT_IF: &str = "eth0";

/// Time limit for the short administrative commands (`ip`, `ss`).
const ADMIN_TIMEOUT: &str = "10";

#[derive(Default)]
struct Resources {
    /// Namespaces to delete, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    /// Processes to kill on cleanup.
    pids: Vec<u32>,
    /// Also stop every process still running inside the namespaces before deleting them
    /// (set by owners whose processes the lab did not start itself: the bench scripts).
    stop_inside: bool,
}

type Shared = Arc<Mutex<Resources>>;

fn registry() -> &'static Mutex<Vec<Shared>> {
    static REG: Mutex<Vec<Shared>> = Mutex::new(Vec::new());
    &REG
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn kill(pid: u32, sig: libc::c_int) {
    if pid > 1 {
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 1 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

fn delete_netns(name: &str) {
    let _ = Command::new("timeout")
        .args([ADMIN_TIMEOUT, "ip", "netns", "del", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Serialises cleanups: a signal-driven cleanup holds it until the process exits, so a
/// [`Lab`] being dropped concurrently waits instead of racing it (or exiting under it).
static CLEANUP: Mutex<()> = Mutex::new(());

/// Kills the processes and deletes the namespaces of one lab (idempotent; the namespace
/// list is only cleared once they are deleted).
fn cleanup_resources(res: &Shared, keep_namespaces: bool) {
    let pids = std::mem::take(&mut lock(res).pids);
    for &p in &pids {
        kill(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && pids.iter().any(|&p| alive_not_zombie(p)) {
        thread::sleep(Duration::from_millis(50));
    }
    for &p in &pids {
        if alive_not_zombie(p) {
            kill(p, libc::SIGKILL);
        }
    }
    if keep_namespaces {
        return;
    }
    let (namespaces, stop_inside) = {
        let r = lock(res);
        (r.namespaces.clone(), r.stop_inside)
    };
    if stop_inside {
        stop_processes_inside(&namespaces);
    }
    for ns in namespaces.iter().rev() {
        delete_netns(ns);
    }
    lock(res).namespaces.clear();
}

/// Stops (SIGTERM, then SIGKILL after 2 s) every process whose network namespace is one of
/// `namespaces`: deleting a namespace does not end the processes inside it, and a server
/// left running there would keep its sockets and files. These namespaces are this lab's
/// own, so every process in them was started for it.
fn stop_processes_inside(namespaces: &[String]) {
    let inside = || -> Vec<u32> {
        namespaces
            .iter()
            .flat_map(|ns| {
                let mut c = Command::new("timeout");
                c.args([ADMIN_TIMEOUT, "ip", "netns", "pids", ns]);
                output_with_timeout(c, Duration::from_secs(15))
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|&p| p != std::process::id())
            .collect()
    };
    let pids = inside();
    if pids.is_empty() {
        return;
    }
    for &p in &pids {
        kill(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && pids.iter().any(|&p| alive_not_zombie(p)) {
        thread::sleep(Duration::from_millis(50));
    }
    for p in inside() {
        kill(p, libc::SIGKILL);
    }
}

/// True if the process exists and is not a zombie waiting to be reaped.
fn alive_not_zombie(pid: u32) -> bool {
    if !alive(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Cleans up every live lab of this process: kills the processes they started and deletes
/// their namespaces. Called by the signal handler; callers that install their own handler
/// should call it before exiting.
pub fn cleanup_all() {
    let _guard = lock(&CLEANUP);
    cleanup_all_locked();
}

fn cleanup_all_locked() {
    let labs: Vec<Shared> = lock(registry()).clone();
    for res in &labs {
        cleanup_resources(res, false);
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a SIGINT/SIGTERM/SIGHUP arrived (the process is about to exit after cleanup).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte from a stack variable.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Installs (once per process) SIGINT/SIGTERM/SIGHUP handlers that clean up every live
/// [`Lab`] ([`cleanup_all`]) and then exit with 128+signal. [`Lab::new`] calls this. The
/// handler only writes to a pipe; a helper thread does the work.
pub fn install_signal_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            eprintln!("fleetboot-lab: cannot create signal pipe; Ctrl-C will not clean up");
            return;
        }
        SIGNAL_FD.store(fds[1], Ordering::Relaxed);
        let rfd = fds[0];
        thread::Builder::new()
            .name("lab-signals".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                loop {
                    // SAFETY: reading one byte into a stack buffer from our own pipe.
                    let n = unsafe { libc::read(rfd, b.as_mut_ptr() as *mut libc::c_void, 1) };
                    if n == 1 {
                        break;
                    }
                    if n < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return;
                }
                eprintln!(
                    "fleetboot-lab: signal {}: cleaning up lab namespaces and processes",
                    b[0]
                );
                // hold the lock until exit so no Lab drop or main-thread exit races us
                let _guard = lock(&CLEANUP);
                cleanup_all_locked();
                std::process::exit(128 + b[0] as i32);
            })
            .ok();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installing a handler that only calls write(2).
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as *const () as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// Runs `f` on a new thread inside network namespace `ns`: the sockets it opens live
/// there, and so do the threads it starts (they inherit it). Panics if `ns` cannot be
/// entered — for tests and lab tools, on namespaces the lab made.
pub fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on a namespace file held open; it changes this thread only.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// `ip netns exec NS PROGRAM` as a [`Command`] (add arguments, stdio, env to it).
pub fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Runs a command to completion with a time limit, capturing stdout and stderr.
pub fn output_with_timeout(mut cmd: Command, limit: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{desc} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Runs `ip ARGS` (bounded) and fails with its stderr if it fails.
pub fn ip(args: &[&str]) -> Result<()> {
    let mut c = Command::new("timeout");
    c.arg(ADMIN_TIMEOUT).arg("ip").args(args);
    let out = output_with_timeout(c, Duration::from_secs(15))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Transport protocol for [`Lab::wait_listening`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// A client namespace joined to the bridge.
#[derive(Clone, Debug)]
pub struct ClientNs {
    /// Namespace name (use with [`netns_command`] / [`Lab::cmd`]).
    pub ns: String,
    /// Interface inside the namespace ([`CLIENT_IF`]).
    pub ifname: String,
    /// The veth end on the bridge, in the switch namespace (e.g. for nftables loss rules).
    pub switch_port: String,
    /// The address given (`"10.77.0.20/24"`), if any.
    pub addr: Option<String>,
}

/// A lab topology; see the module documentation.
pub struct Lab {
    id: String,
    switch: String,
    server: String,
    res: Shared,
    taps: Vec<String>,
    clients: Vec<ClientNs>,
    children: Vec<(String, Child)>,
    keep: bool,
}

impl Lab {
    /// Creates the switch namespace with `br0` and the server namespace with `srv0`
    /// (10.77.0.1/24 `brd +`, fd77::1/64 `nodad`). Needs root.
    pub fn new() -> Result<Lab> {
        Lab::with_server_addr(&format!("{SERVER_ADDR}/24"))
    }

    /// Like [`Lab::new`], with `srv0` at `server_cidr` (e.g. `"10.79.0.1/16"`, for a DHCP
    /// pool larger than a /24) instead of 10.77.0.1/24.
    pub fn with_server_addr(server_cidr: &str) -> Result<Lab> {
        install_signal_cleanup();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, taps)");
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("fbl{}x{}", std::process::id(), n);
        let res: Shared = Arc::default();
        lock(registry()).push(res.clone());
        let mut lab = Lab {
            switch: format!("{id}-sw"),
            server: format!("{id}-srv"),
            id,
            res,
            taps: Vec::new(),
            clients: Vec::new(),
            children: Vec::new(),
            keep: false,
        };
        // On any error below, dropping `lab` deletes what was created.
        let (sw, srv) = (lab.switch.clone(), lab.server.clone());
        lab.add_netns(&sw)?;
        lab.add_netns(&srv)?;
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &sw, "link", "set", BRIDGE, "up"])?;
        ip(&[
            "-n", &sw, "link", "add", "sw-srv", "type", "veth", "peer", "name", SERVER_IF, "netns",
            &srv,
        ])?;
        ip(&["-n", &sw, "link", "set", "sw-srv", "master", BRIDGE, "up"])?;
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            server_cidr,
            "brd",
            "+",
            "dev",
            SERVER_IF,
        ])?;
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SERVER_ADDR6}/64"),
            "dev",
            SERVER_IF,
            "nodad",
        ])?;
        ip(&["-n", &srv, "link", "set", SERVER_IF, "up"])?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        lock(&self.res).namespaces.push(name.to_string());
        ip(&["netns", "add", name])?;
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Adds a namespace of this lab (`<id>-<suffix>`, loopback up, nothing else), deleted
    /// with the lab: for topologies beyond the bridge, such as a WAN link between two
    /// namespaces. Returns its name.
    pub fn add_namespace(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.id);
        self.add_netns(&name)?;
        Ok(name)
    }

    /// This lab's unique id (prefix of its namespace names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The switch namespace (bridge, taps; QEMU runs here).
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// The server namespace (`srv0`, 10.77.0.1).
    pub fn server_ns(&self) -> &str {
        &self.server
    }

    /// Taps created so far.
    pub fn taps(&self) -> &[String] {
        &self.taps
    }

    /// Client namespaces created so far.
    pub fn clients(&self) -> &[ClientNs] {
        &self.clients
    }

    /// Keep the namespaces after drop (for debugging; processes are still killed).
    pub fn set_keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// On cleanup (drop, signal), also stop every process still inside the lab's
    /// namespaces, not only those started through the lab: for owners that start their
    /// servers and clients themselves (`ip netns exec`), such as the bench scripts.
    pub fn set_stop_processes_inside(&mut self, stop: bool) {
        lock(&self.res).stop_inside = stop;
    }

    /// Adds a tap (`tapN`) on the bridge for a QEMU VM and returns its name.
    pub fn add_tap(&mut self) -> Result<String> {
        let name = format!("tap{}", self.taps.len());
        ip(&[
            "-n",
            &self.switch,
            "tuntap",
            "add",
            "dev",
            &name,
            "mode",
            "tap",
        ])?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &name,
            "master",
            BRIDGE,
            "up",
        ])?;
        self.taps.push(name.clone());
        Ok(name)
    }

    /// Adds a client namespace joined to the bridge, with interface `eth0` up and, if
    /// `addr` is given (CIDR, e.g. `"10.77.0.20/24"`), that address with `brd +` plus a
    /// 224.0.0.0/4 route (multicast). Without an address it is ready for dhclient.
    pub fn add_client(&mut self, addr: Option<&str>) -> Result<ClientNs> {
        let i = self.clients.len();
        let ns = format!("{}-c{}", self.id, i);
        let port = format!("sw-c{i}");
        self.add_netns(&ns)?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            BRIDGE,
            "up",
        ])?;
        if let Some(a) = addr {
            ip(&["-n", &ns, "addr", "add", a, "brd", "+", "dev", CLIENT_IF])?;
        }
        ip(&["-n", &ns, "link", "set", CLIENT_IF, "up"])?;
        if addr.is_some() {
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", CLIENT_IF])?;
        }
        let c = ClientNs {
            ns,
            ifname: CLIENT_IF.to_string(),
            switch_port: port,
            addr: addr.map(str::to_string),
        };
        self.clients.push(c.clone());
        Ok(c)
    }

    /// `ip netns exec NS PROGRAM` (see [`netns_command`]).
    pub fn cmd(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        netns_command(ns, program)
    }

    /// Runs `ARGS` inside `ns` to completion (bounded by `limit`) and returns its output;
    /// fails if it exits unsuccessfully.
    pub fn exec(&self, ns: &str, args: &[&str], limit: Duration) -> Result<Output> {
        let (prog, rest) = args.split_first().context("empty command")?;
        let mut c = self.cmd(ns, prog);
        c.args(rest);
        let out = output_with_timeout(c, limit)?;
        if !out.status.success() {
            bail!(
                "`{}` in {ns} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Starts a long-running process owned by the lab (a server): it is killed when the lab
    /// is dropped or by [`Lab::stop`]. Wrap it in `timeout` yourself for an upper bound.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<u32> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        lock(&self.res).pids.push(pid);
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Starts a process the caller owns (and must wait for); its pid is killed on cleanup
    /// until the caller calls [`Lab::untrack`] after reaping it.
    pub fn spawn_tracked(&self, cmd: &mut Command) -> Result<Child> {
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        lock(&self.res).pids.push(child.id());
        Ok(child)
    }

    /// Forgets a pid registered by [`Lab::spawn_tracked`] (after the caller reaped it).
    pub fn untrack(&self, pid: u32) {
        lock(&self.res).pids.retain(|&p| p != pid);
    }

    /// If a process started with [`Lab::spawn`] has already exited, its name and status.
    pub fn exited(&mut self, pid: u32) -> Option<ExitStatus> {
        let (_, child) = self.children.iter_mut().find(|(_, c)| c.id() == pid)?;
        child.try_wait().ok().flatten()
    }

    /// Stops a process started with [`Lab::spawn`]: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, pid: u32, grace: Duration) -> Option<ExitStatus> {
        let idx = self.children.iter().position(|(_, c)| c.id() == pid)?;
        let (_, mut child) = self.children.remove(idx);
        let status = stop_child(&mut child, grace);
        self.untrack(pid);
        status
    }

    /// Stops every process started with [`Lab::spawn`] (see [`Lab::stop`]).
    pub fn stop_all(&mut self, grace: Duration) {
        let pids: Vec<u32> = self.children.iter().map(|(_, c)| c.id()).collect();
        for p in &pids {
            kill(*p, libc::SIGTERM);
        }
        for p in pids {
            self.stop(p, grace);
        }
    }

    /// Waits until something listens on `port` (`proto`) inside `ns`, checked with `ss`.
    pub fn wait_listening(&self, ns: &str, proto: Proto, port: u16, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.is_listening(ns, proto, port)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nothing listens on {proto:?} port {port} in {ns} after {limit:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether something listens on `port` (`proto`) inside `ns` right now.
    pub fn is_listening(&self, ns: &str, proto: Proto, port: u16) -> Result<bool> {
        let flag = match proto {
            Proto::Udp => "-Hlun",
            Proto::Tcp => "-Hltn",
        };
        let out = self.exec(ns, &["ss", flag], Duration::from_secs(10))?;
        let suffix = format!(":{port}");
        Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            // columns: State Recv-Q Send-Q Local:Port Peer:Port; local may be "addr%dev:port"
            l.split_whitespace()
                .nth(3)
                .is_some_and(|local| local.ends_with(&suffix))
        }))
    }
}

fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    kill(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _guard = lock(&CLEANUP);
        self.stop_all(Duration::from_secs(2));
        cleanup_resources(&self.res, self.keep);
        if self.keep {
            let names = lock(&self.res).namespaces.join(" ");
            eprintln!("fleetboot-lab: kept namespaces (delete with `ip netns del NAME`): {names}");
        }
        lock(registry()).retain(|r| !Arc::ptr_eq(r, &self.res));
    }
}

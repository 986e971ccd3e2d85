//! Helpers for the end-to-end tests with real clients (`tests/real_clients.rs`).
//!
//! Every test builds its own [`fleetboot_lab::netns::Lab`] (private namespaces: a switch
//! with `br0`, a server namespace with `srv0` = 10.77.0.1/24, client namespaces), writes a
//! config into a per-test directory under `std::env::temp_dir()`, starts the real
//! `fleetboot serve` inside the server namespace (tracked by the lab, so it is killed on
//! drop) and runs real clients (dhclient, curl, tftp-hpa, atftp, python3) inside client
//! namespaces. Nothing here touches the default namespace's interfaces, addresses or
//! routes; every command runs under a time limit.
//!
//! Gating: without root or a needed tool a test prints why and returns early, unless
//! `FLEETBOOT_REQUIRE_E2E=1` (CI) makes that a failure. `FLEETBOOT_E2E_KEEP=1` keeps the
//! per-test directories (configs, server logs, client logs).

#![allow(dead_code)]

use fleetboot_lab::netns::{output_with_timeout, ClientNs, Lab, Proto, CLIENT_IF};
use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");
/// HTTP base URL of the server inside the lab (the boot network's file service).
pub const HTTP: &str = "http://10.77.0.1:8080";
/// The API's base URL, from inside the server's namespace (`admin.listen` defaults to
/// loopback: the boot network cannot reach it).
pub const API: &str = "http://127.0.0.1:8081";

/// Whether the environment can run a test needing `tools` (plus the basics every test
/// here uses); see `fleetboot_lab::gate`.
pub fn e2e_ready(test: &str, tools: &[&str]) -> bool {
    let mut all = vec!["ip", "ss", "timeout", "sha256sum", "curl"];
    all.extend_from_slice(tools);
    fleetboot_lab::gate::e2e_ready(test, &all)
}

#[allow(unused_imports)]
pub use fleetboot_lab::gate::which;

/// A per-test directory under the system temp dir, removed on drop (unless
/// `FLEETBOOT_E2E_KEEP=1`).
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "fleetboot-e2e-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("creating the test directory");
        TestDir { path }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var("FLEETBOOT_E2E_KEEP").as_deref() == Ok("1") {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a file, hex, by `sha256sum`.
pub fn sha256(path: &Path) -> String {
    let mut c = Command::new("sha256sum");
    c.arg(path);
    let out = output_with_timeout(c, Duration::from_secs(120)).expect("running sha256sum");
    assert!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Asserts that `got` is byte-identical to `want` by SHA-256 (and length).
pub fn assert_same_file(what: &str, want: &Path, got: &Path) {
    let want_len = fs::metadata(want).map(|m| m.len()).unwrap_or(u64::MAX);
    let got_len = fs::metadata(got).map(|m| m.len());
    assert_eq!(
        got_len.as_ref().ok(),
        Some(&want_len),
        "{what}: {} has the wrong length ({got_len:?}, want {want_len})",
        got.display()
    );
    assert_eq!(
        sha256(got),
        sha256(want),
        "{what}: {} differs from {} (SHA-256)",
        got.display(),
        want.display()
    );
}

/// A finished client command.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// The server and its lab: one per test.
pub struct Env {
    pub dir: TestDir,
    pub config: PathBuf,
    pub root: PathBuf,
    pub server_pid: Option<u32>,
    run_counter: u32,
    // Declared last: dropped after everything above (kills the server, deletes namespaces).
    pub lab: Lab,
}

/// The base configuration: everything in the per-test directory, the lab's addresses.
pub fn base_config(dir: &Path) -> String {
    format!(
        r##"data_dir = "{data}"

[server]
address = "10.77.0.1"
interface = "srv0"
root = "{root}"

[dhcp]
mode = "server"

[[dhcp.subnet]]
network = "10.77.0.0/24"
range = ["10.77.0.100", "10.77.0.199"]
router = "10.77.0.1"
dns = ["10.77.0.1"]
lease_time = 3600

[pxe]
transport = "http"

[tftp]
enabled = true
listen = "0.0.0.0:69"

[http]
enabled = true
listen = "0.0.0.0:8080"

[[client]]
mac = "52:54:00:77:00:10"
group = "lab"

[[profile]]
name = "lab-linux"
priority = 10
match = {{ group = ["lab"] }}
boot = {{ kind = "linux", kernel = "vmlinuz", initrd = ["initrd.gz"], cmdline = "console=ttyS0 panic=-1" }}

[[profile]]
name = "everyone-else"
priority = 1000
boot = {{ kind = "script", script = "#!ipxe\necho no work for {{mac}} today\nexit 1" }}
"##,
        data = dir.join("data").display(),
        root = dir.join("root").display(),
    )
}

impl Env {
    /// A lab, a test directory with `root/` and the base config (not started yet).
    pub fn new(name: &str) -> Env {
        let lab = Lab::new().expect("creating the lab namespaces");
        let dir = TestDir::new(name);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        let config = dir.join("fb.toml");
        fs::write(&config, base_config(&dir.path)).unwrap();
        Env {
            dir,
            config,
            root,
            server_pid: None,
            run_counter: 0,
            lab,
        }
    }

    pub fn server_ns(&self) -> String {
        self.lab.server_ns().to_string()
    }

    pub fn server_log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Writes `data` to `root/NAME` and returns its path.
    pub fn put_file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.root.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&p, data).unwrap();
        p
    }

    /// Starts `fleetboot serve` in the server namespace (under `timeout`, tracked by the
    /// lab) and waits until DHCP (67), TFTP (69), HTTP (8080) and the API (8081) listen.
    pub fn start_server(&mut self) {
        assert!(self.server_pid.is_none(), "server already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.server_log())
            .unwrap();
        let mut cmd = self.lab.cmd(self.lab.server_ns(), "timeout");
        cmd.args(["-s", "TERM", "-k", "10", "1800", BIN, "serve", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("FLEETBOOT_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let pid = self
            .lab
            .spawn("fleetboot", cmd)
            .expect("starting fleetboot");
        self.server_pid = Some(pid);
        let ns = self.server_ns();
        for (proto, port) in [(Proto::Udp, 67), (Proto::Udp, 69), (Proto::Tcp, 8080), (Proto::Tcp, 8081)] {
            if let Err(e) = self
                .lab
                .wait_listening(&ns, proto, port, Duration::from_secs(30))
            {
                panic!(
                    "fleetboot did not come up: {e:#}\n--- server log ---\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Stops the server with SIGTERM (SIGKILL after 10 s) and waits until its ports are
    /// free.
    pub fn stop_server(&mut self) {
        let pid = self.server_pid.take().expect("server not running");
        self.lab.stop(pid, Duration::from_secs(10));
        self.wait_ports_free();
    }

    /// Kills the fleetboot process with SIGKILL (a crash: no shutdown code runs), reaps
    /// its `timeout` wrapper and waits until its ports are free.
    pub fn crash_server(&mut self) {
        let pid = self.server_pid.take().expect("server not running");
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut killed = 0;
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.trim() == "fleetboot" {
                // SAFETY: kill(2) on the fleetboot process this test started (child of
                // the tracked `timeout`).
                unsafe { libc::kill(child, libc::SIGKILL) };
                killed += 1;
            }
        }
        assert_eq!(killed, 1, "found no fleetboot process under pid {pid}");
        let status = self.lab.stop(pid, Duration::from_secs(10));
        // timeout(1) passes its child's death on: it dies of the same signal (or exits
        // with 128+9 on some versions)
        use std::os::unix::process::ExitStatusExt;
        let killed =
            status.is_some_and(|s| s.signal() == Some(libc::SIGKILL) || s.code() == Some(137));
        assert!(killed, "the server did not die of the SIGKILL: {status:?}");
        self.wait_ports_free();
    }

    fn wait_ports_free(&self) {
        let ns = self.server_ns();
        // the ports must be free before a restart
        for _ in 0..100 {
            let busy = [(Proto::Udp, 67), (Proto::Udp, 69), (Proto::Tcp, 8080), (Proto::Tcp, 8081)]
                .iter()
                .any(|&(p, port)| self.lab.is_listening(&ns, p, port).unwrap_or(true));
            if !busy {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("the stopped server's ports are still in use");
    }

    /// True if the server process is still running.
    pub fn server_alive(&mut self) -> bool {
        match self.server_pid {
            Some(pid) => self.lab.exited(pid).is_none(),
            None => false,
        }
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.server_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Adds a client namespace; with `mac`, its `eth0` gets that address.
    pub fn add_client(&mut self, addr: Option<&str>, mac: Option<&str>) -> ClientNs {
        let c = self
            .lab
            .add_client(addr)
            .expect("adding a client namespace");
        if let Some(mac) = mac {
            self.ip(&c.ns, &["link", "set", "dev", CLIENT_IF, "down"]);
            self.ip(&c.ns, &["link", "set", "dev", CLIENT_IF, "address", mac]);
            self.ip(&c.ns, &["link", "set", "dev", CLIENT_IF, "up"]);
        }
        c
    }

    /// `ip -n NS ARGS` (only ever for namespaces this lab created).
    pub fn ip(&self, ns: &str, args: &[&str]) {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        fleetboot_lab::netns::ip(&full).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The MAC address of `eth0` in a client namespace (lower case, colons).
    pub fn mac_of(&self, ns: &str) -> String {
        let out = self
            .lab
            .exec(
                ns,
                &["cat", "/sys/class/net/eth0/address"],
                Duration::from_secs(10),
            )
            .expect("reading the client's MAC");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .to_ascii_lowercase()
    }

    /// Runs `args` inside `ns` under `timeout LIMIT` (and a hard outer limit), with stdout
    /// and stderr going to files (so a program that daemonizes cannot hold a pipe open).
    pub fn run(&mut self, ns: &str, args: &[&str], limit_secs: u64) -> Ran {
        self.run_counter += 1;
        let n = self.run_counter;
        let out_path = self.dir.join(format!("run{n}.out"));
        let err_path = self.dir.join(format!("run{n}.err"));
        let limit = limit_secs.to_string();
        let mut cmd = self.lab.cmd(ns, "timeout");
        cmd.args(["-k", "5", &limit])
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap());
        let mut child = self
            .lab
            .spawn_tracked(&mut cmd)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let deadline = Instant::now() + Duration::from_secs(limit_secs + 20);
        let status = loop {
            if let Some(s) = child.try_wait().expect("waiting for a client") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.lab.untrack(child.id());
                panic!("`{}` in {ns} outlived its time limit", args.join(" "));
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.lab.untrack(child.id());
        Ran {
            status,
            stdout: fs::read(&out_path).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned(),
        }
    }

    /// Runs `args` inside `ns` and panics (with its stderr and the server log) on failure.
    pub fn run_ok(&mut self, ns: &str, args: &[&str], limit_secs: u64) -> Ran {
        let r = self.run(ns, args, limit_secs);
        if !r.ok() {
            panic!(
                "`{}` in {ns} failed ({}):\n{}\n--- server log ---\n{}",
                args.join(" "),
                r.status,
                r.stderr,
                self.log_tail()
            );
        }
        r
    }

    /// An HTTP request with curl from `ns`: returns the status code and the body.
    /// `extra` goes before the URL (method, headers, data, range ...).
    pub fn http(&mut self, ns: &str, extra: &[&str], url: &str) -> (u16, Vec<u8>) {
        self.run_counter += 1;
        let body = self.dir.join(format!("http{}.body", self.run_counter));
        let body_s = body.to_string_lossy().into_owned();
        let mut args = vec![
            "curl",
            "-sS",
            "--max-time",
            "60",
            "-o",
            &body_s,
            "-w",
            "%{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        let r = self.run_ok(ns, &args, 90);
        let code: u16 = r
            .stdout_str()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl printed no status code: {:?}", r.stdout_str()));
        (code, fs::read(&body).unwrap_or_default())
    }

    /// The admin token the server made at its first start (`data_dir/admin.token`).
    pub fn token(&self) -> String {
        let path = self.dir.join("data/admin.token");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// A request to the API from the server's namespace, with the admin token: the
    /// status code and the body. `extra` goes before the URL, as in [`Env::http`].
    pub fn api(&mut self, extra: &[&str], path: &str) -> (u16, Vec<u8>) {
        self.api_as(&self.token(), extra, path)
    }

    /// [`Env::api`] with the token `token`.
    pub fn api_as(&mut self, token: &str, extra: &[&str], path: &str) -> (u16, Vec<u8>) {
        let ns = self.server_ns();
        let auth = format!("Authorization: Bearer {token}");
        let mut args = vec!["-H", auth.as_str()];
        args.extend_from_slice(extra);
        self.http(&ns, &args, &format!("{API}{path}"))
    }

    /// GET a JSON document from the API.
    pub fn get_json(&mut self, path: &str) -> serde_json::Value {
        let (code, body) = self.api(&[], path);
        assert_eq!(code, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "GET {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })
    }

    /// The leases listed by `GET /api/leases`.
    pub fn leases(&mut self) -> Vec<serde_json::Value> {
        self.get_json("/api/leases")
            .as_array()
            .expect("/api/leases is an array")
            .clone()
    }

    /// The lease of `ip` in `/api/leases`, if listed.
    pub fn lease_of(&mut self, ip: Ipv4Addr) -> Option<serde_json::Value> {
        let ip = ip.to_string();
        self.leases()
            .into_iter()
            .find(|l| l["ip"].as_str() == Some(ip.as_str()))
    }

    /// The kinds of the events in `GET /api/trace/MAC`.
    pub fn trace_kinds(&mut self, mac: &str) -> Vec<String> {
        self.get_json(&format!("/api/trace/{mac}"))
            .as_array()
            .expect("trace is an array")
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// `fleetboot trace MAC --config FILE --json` (reads the store directly).
    pub fn trace_cli(&self, mac: &str) -> Vec<serde_json::Value> {
        let mut c = Command::new("timeout");
        c.args(["60", BIN, "trace", mac, "--config"])
            .arg(&self.config)
            .arg("--json");
        let out = output_with_timeout(c, Duration::from_secs(70)).expect("fleetboot trace");
        assert!(
            out.status.success(),
            "fleetboot trace failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .expect("fleetboot trace --json prints JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The value of an unlabelled counter in `/metrics` (0 when absent).
    pub fn metric(&mut self, name: &str) -> f64 {
        let (code, body) = self.api(&[], "/metrics");
        assert_eq!(code, 200, "GET /metrics");
        parse_metric(&String::from_utf8_lossy(&body), name)
    }

    /// Retries `check` (at most `tries` times, 200 ms apart) until it returns true; for
    /// effects the server applies asynchronously (trace events, lease removal).
    pub fn eventually(&mut self, tries: u32, mut check: impl FnMut(&mut Env) -> bool) -> bool {
        for _ in 0..tries {
            if check(self) {
                return true;
            }
            thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- fleetboot server log ({}) ---\n{}",
                self.server_log().display(),
                self.log_tail()
            );
        }
    }
}

/// Sums the samples of a metric in Prometheus text format: `name` alone matches every
/// label set, `name{label="value"}` only the samples carrying that label.
pub fn parse_metric(text: &str, name: &str) -> f64 {
    let (want_base, want_label) = match name.split_once('{') {
        Some((b, l)) => (b, Some(l.trim_end_matches('}'))),
        None => (name, None),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (base, labels) = match key.split_once('{') {
                Some((b, l)) => (b, l.trim_end_matches('}')),
                None => (key, ""),
            };
            let labels_ok = want_label.is_none_or(|w| labels.split(',').any(|x| x == w));
            (base == want_base && labels_ok)
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .fold(0.0, |a, b| a + b)
}

/// One dhclient identity: its lease file and pid file in the test directory. The daemon
/// dhclient leaves behind after `-1` succeeds is killed by its pid file (also on drop).
pub struct Dhclient {
    pub ns: String,
    pub lease_file: PathBuf,
    pub pid_file: PathBuf,
}

impl Dhclient {
    pub fn new(env: &Env, client: &ClientNs, tag: &str) -> Dhclient {
        Dhclient {
            ns: client.ns.clone(),
            lease_file: env.dir.join(format!("dhclient-{tag}.leases")),
            pid_file: env.dir.join(format!("dhclient-{tag}.pid")),
        }
    }

    fn base_args(&self) -> Vec<String> {
        vec![
            "dhclient".into(),
            "-sf".into(),
            "/bin/true".into(),
            "-lf".into(),
            self.lease_file.display().to_string(),
            "-pf".into(),
            self.pid_file.display().to_string(),
        ]
    }

    /// `dhclient -1 -v -sf /bin/true -lf FILE -pf FILE eth0`: the address it is bound to
    /// (from its lease file, cross-checked with its "bound to" line). The background
    /// daemon it leaves is killed before this returns.
    pub fn obtain(&self, env: &mut Env) -> Ipv4Addr {
        self.kill_daemon();
        let _ = fs::remove_file(&self.pid_file);
        let mut args = self.base_args();
        args.splice(1..1, ["-1".to_string(), "-v".to_string()]);
        args.push(CLIENT_IF.into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = env.run(&self.ns, &argv, 90);
        // It daemonizes on success; wait (bounded) for its pid file, then kill it.
        for _ in 0..50 {
            if self.pid_file.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.kill_daemon();
        if !r.ok() {
            panic!(
                "dhclient -1 in {} got no lease ({}):\n{}\n--- server log ---\n{}",
                self.ns,
                r.status,
                r.stderr,
                env.log_tail()
            );
        }
        let ip = self
            .last_fixed_address()
            .unwrap_or_else(|| panic!("no lease in {}:\n{}", self.lease_file.display(), r.stderr));
        assert!(
            r.stderr.contains(&format!("bound to {ip}")),
            "dhclient's lease file says {ip} but it printed:\n{}",
            r.stderr
        );
        ip
    }

    /// `dhclient -r -v -sf /bin/true -lf FILE -pf FILE eth0`: sends DHCPRELEASE.
    pub fn release(&self, env: &mut Env) {
        self.kill_daemon();
        let mut args = self.base_args();
        args.splice(1..1, ["-r".to_string(), "-v".to_string()]);
        args.push(CLIENT_IF.into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        env.run_ok(&self.ns, &argv, 60);
        self.kill_daemon();
    }

    /// The newest `fixed-address` in the lease file.
    pub fn last_fixed_address(&self) -> Option<Ipv4Addr> {
        let text = fs::read_to_string(&self.lease_file).ok()?;
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("fixed-address "))
            .filter_map(|a| a.trim_end_matches(';').trim().parse().ok())
            .next_back()
    }

    /// Kills the dhclient named by the pid file, if it is still a dhclient.
    pub fn kill_daemon(&self) {
        let Some(pid) = fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|p| *p > 1)
        else {
            return;
        };
        let is_dhclient = |pid: i32| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "dhclient")
                .unwrap_or(false)
        };
        if !is_dhclient(pid) {
            return;
        }
        // SAFETY: kill(2) on the pid dhclient wrote for this test's pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..50 {
            if !is_dhclient(pid) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

impl Drop for Dhclient {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

/// Path of a file as a `String` argument.
pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The last `n` lines of a file.
#[allow(dead_code)]
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// [`boot_disk_vm`] stops QEMU after this many times its silence limit in any case.
pub const VM_HANG_FACTOR: u64 = 5;

/// A QEMU VM (TCG) started from `kernel` + `initrd` with `append` on its command line and
/// `disk` (an `nbd://` URL) as its NVMe drive, in namespace `ns`. Its console is read line
/// by line into `dir/vm-<boot>.log` until a line starting with `"<tag> "` that names
/// ` boot=<boot> ` — which is returned — or `"<tag>-FAIL"`, a kernel panic, QEMU's exit or
/// a console silent for `limit_secs`, which panic with the console's tail. Silence, not
/// total time: a VM on a loaded machine is slow but keeps printing, a hung one does not
/// (QEMU itself is stopped after `VM_HANG_FACTOR` × `limit_secs` whatever it prints).
/// (The lab kernel has no virtio_blk: NVMe is the disk it can see.)
#[allow(dead_code, clippy::too_many_arguments)]
pub fn boot_disk_vm(
    lab: &Lab,
    ns: &str,
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    append: &str,
    disk: &str,
    boot: &str,
    tag: &str,
    limit_secs: u64,
) -> String {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::mpsc;
    let log_path = dir.join(format!("vm-{boot}.log"));
    let err_path = dir.join(format!("vm-{boot}.qemu.err"));
    let mut log = File::create(&log_path).unwrap();
    let mut cmd = lab.cmd(ns, "timeout");
    let hard_limit = limit_secs * VM_HANG_FACTOR;
    cmd.args(["--kill-after=5", &hard_limit.to_string(), "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-m", "256", "-nodefaults", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("{append} fleetboot.boot={boot}"))
        .arg("-drive")
        .arg(format!("file={disk},format=raw,if=none,id=d0"))
        .args(["-device", "nvme,drive=d0,serial=fleetboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&err_path).unwrap());
    let t0 = Instant::now();
    let mut child = lab.spawn_tracked(&mut cmd).expect("starting QEMU");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    // The guest powers off milliseconds after its line: read the pipe line by line.
    let reader = thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let silence = Duration::from_secs(limit_secs);
    let mut deadline = t0 + silence;
    let (want, fail, this_boot) = (format!("{tag} "), format!("{tag}-FAIL"), format!(" boot={boot} "));
    let result = loop {
        let now = Instant::now();
        if now >= deadline {
            break Err(format!("the console was silent for {limit_secs} s, no {tag} line"));
        }
        match rx.recv_timeout(deadline - now) {
            Ok(line) => {
                deadline = Instant::now() + silence;
                let _ = writeln!(log, "{:8.3} {line}", t0.elapsed().as_secs_f64());
                let clean = fleetboot_lab::vm::strip_ansi(&line);
                if clean.starts_with(&want) && clean.contains(&this_boot) {
                    break Ok(clean);
                } else if clean.starts_with(&fail) || clean.contains("Kernel panic") {
                    break Err(clean);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err(format!("QEMU exited without the {tag} line")),
        }
    };
    // The guest powers off by itself after its line; give QEMU a moment, then stop it.
    let stop_at = Instant::now() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < stop_at => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    lab.untrack(pid);
    drop(rx);
    let _ = reader.join();
    match result {
        Ok(line) => {
            eprintln!("boot {boot}: {line} ({:.1} s)", t0.elapsed().as_secs_f64());
            line
        }
        Err(why) => panic!(
            "VM boot {boot}: {why}\nconsole {}:\n{}\nqemu stderr: {}",
            log_path.display(),
            tail(&log_path, 25),
            fs::read_to_string(&err_path).unwrap_or_default()
        ),
    }
}

/// Runs `args` on the host (not in a namespace: local files only), bounded in time, and
/// returns its stdout; panics with its output when it fails.
#[allow(dead_code)]
pub fn host(args: &[&str], limit_secs: u64) -> String {
    let mut c = Command::new("timeout");
    c.arg(limit_secs.to_string()).args(args);
    let out = output_with_timeout(c, Duration::from_secs(limit_secs + 10)).expect("running a host command");
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `fleetboot ARGS --config CONFIG` on the host (the `image`, `store`... commands that
/// work on local files), as [`host`] does.
pub fn fleetboot_with_config(args: &[&str], config: &Path) -> String {
    let mut full = vec![BIN];
    full.extend_from_slice(args);
    let cfg = s(config);
    full.extend_from_slice(&["--config", &cfg]);
    host(&full, 120)
}

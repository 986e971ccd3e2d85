//! A branch behind a WAN, in network namespaces, for the edge cache tests and benchmark:
//!
//! ```text
//!  <id>-origin                 <id>-sw (switch)                      <id>-srv = the branch gateway
//!  wan0 192.0.2.1/24 ── sw-wo ─ brwan ─ sw-wc ── wan0 192.0.2.2/24     srv0 10.77.0.1/24 ── br0 ── clients, taps
//!  tbf (rate)            nftables: loss % each way, or a cut          tbf (rate), forwarding on
//! ```
//!
//! The origin runs `fleetboot serve` with `[origin]`; the gateway runs `fleetboot cache`
//! (or nothing, or nginx) and the branch's DHCP (dnsmasq: a local server, or a relay to the
//! origin's DHCP). The WAN is shaped with `tc tbf` inside the two namespaces and loses
//! packets on the WAN bridge through nftables (the kernel has no netem). Everything goes
//! with the [`Lab`] (namespaces deleted, processes it started killed).

#![allow(dead_code)]

use fleetboot_cache::keys::{from_seed, public_hex, secret_hex};
use fleetboot_lab::netns::{ip, output_with_timeout, ClientNs, Lab, Proto};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetboot");
pub const ORIGIN: &str = "192.0.2.1";
pub const GATEWAY_WAN: &str = "192.0.2.2";
pub const GATEWAY_LAN: &str = "10.77.0.1";

pub fn ready(test: &str, extra_tools: &[&str]) -> bool {
    let payload = fleetboot_lab::payload::default_dir();
    let have_payload = payload.join("vmlinuz").is_file() && payload.join("initrd.gz").is_file();
    let mut tools = vec!["ip", "ss", "timeout", "tc", "nft", "dnsmasq", "curl"];
    tools.extend_from_slice(extra_tools);
    fleetboot_lab::gate::e2e_ready_with(test, &tools, &[(have_payload, "no lab payload (scripts/setup.sh builds it)")])
}

/// A work directory, removed unless `FLEETBOOT_E2E_KEEP=1`.
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    pub fn new(name: &str) -> WorkDir {
        let p = std::env::temp_dir().join(format!("fleetboot-cache-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("root")).unwrap();
        WorkDir(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var("FLEETBOOT_E2E_KEEP").as_deref() != Ok("1") {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    fleetboot_emulator::sha256_hex(data)
}

/// Deterministic bytes (xorshift).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn write_key(path: &Path, seed: u8) -> String {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let k = from_seed([seed; 32]);
    std::fs::write(path, secret_hex(&k)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    public_hex(&k.verifying_key())
}

/// How the branch's clients reach the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The branch's DHCP (dnsmasq on the gateway) sends clients to the cache.
    Explicit,
    /// Clients talk to the origin (its DHCP, relayed by the gateway); the gateway diverts
    /// connections to the origin's HTTP port to the cache (TPROXY).
    Transparent,
}

pub struct Wan {
    pub lab: Lab,
    pub dir: WorkDir,
    pub origin_ns: String,
    pub gw_ns: String,
    pub client: ClientNs,
    pub origin_pid: Option<u32>,
    pub cache_pid: Option<u32>,
    pub dhcp_pid: Option<u32>,
    pub origin_key: String,
    pub cache_key: String,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub nonce: String,
}

impl Wan {
    /// The topology with the WAN at `rate` (tc tbf) and `loss_pct` % loss each way; the lab
    /// payload's kernel and initrd in the origin's root.
    pub fn new(name: &str, rate: &str, loss_pct: u32) -> Wan {
        let dir = WorkDir::new(name);
        let mut lab = Lab::new().expect("creating the lab namespaces");
        let origin_ns = lab.add_namespace("origin").unwrap();
        let gw_ns = lab.server_ns().to_string();
        let sw = lab.switch_ns().to_string();
        ip(&["-n", &sw, "link", "add", "brwan", "type", "bridge", "stp_state", "0", "forward_delay", "0"]).unwrap();
        ip(&["-n", &sw, "link", "set", "brwan", "up"]).unwrap();
        for (port, ns, addr) in [("sw-wo", &origin_ns, ORIGIN), ("sw-wc", &gw_ns, GATEWAY_WAN)] {
            ip(&["-n", &sw, "link", "add", port, "type", "veth", "peer", "name", "wan0", "netns", ns]).unwrap();
            ip(&["-n", &sw, "link", "set", port, "master", "brwan", "up"]).unwrap();
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "wan0"]).unwrap();
            ip(&["-n", ns, "link", "set", "wan0", "up"]).unwrap();
        }
        ip(&["-n", &origin_ns, "route", "add", "10.77.0.0/24", "via", GATEWAY_WAN]).unwrap();
        let client = lab.add_client(None).unwrap();
        // An address of its own for curl (the emulated clients add theirs from DHCP), and
        // the way to the origin through the gateway.
        ip(&["-n", &client.ns, "addr", "add", "10.77.0.50/24", "dev", "eth0"]).unwrap();
        ip(&["-n", &client.ns, "route", "add", "192.0.2.0/24", "via", GATEWAY_LAN, "dev", "eth0"]).unwrap();
        let kernel = std::fs::read(fleetboot_lab::payload::default_dir().join("vmlinuz")).unwrap();
        let initrd = std::fs::read(fleetboot_lab::payload::default_dir().join("initrd.gz")).unwrap();
        std::fs::write(dir.0.join("root/vmlinuz"), &kernel).unwrap();
        std::fs::write(dir.0.join("root/initrd.gz"), &initrd).unwrap();
        let origin_key = write_key(&dir.0.join("origin-data/origin/origin.key"), 0x0a);
        let cache_key = write_key(&dir.0.join("cache-data/cache/cache.key"), 0x0c);
        let nonce = format!("{:x}", std::process::id() as u64 * 7919 + name.len() as u64);
        let wan = Wan {
            lab,
            dir,
            origin_ns,
            gw_ns,
            client,
            origin_pid: None,
            cache_pid: None,
            dhcp_pid: None,
            origin_key,
            cache_key,
            kernel,
            initrd,
            nonce,
        };
        wan.sh(&wan.gw_ns.clone(), "sysctl -qw net.ipv4.ip_forward=1");
        wan.shape(rate);
        wan.set_loss(loss_pct);
        wan
    }

    /// Runs a shell command in `ns`; panics with its output if it fails.
    pub fn sh(&self, ns: &str, cmd: &str) -> String {
        let out = self.lab.exec(ns, &["sh", "-c", cmd], Duration::from_secs(60)).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The WAN's rate, both ways.
    pub fn shape(&self, rate: &str) {
        for ns in [&self.origin_ns, &self.gw_ns] {
            self.sh(ns, &format!("tc qdisc replace dev wan0 root tbf rate {rate} burst 64kbit latency 100ms"));
        }
    }

    /// `pct` % of frames crossing the WAN bridge are dropped, each way.
    pub fn set_loss(&self, pct: u32) {
        let sw = self.lab.switch_ns().to_string();
        self.sh(&sw, "nft delete table bridge fbwanloss 2>/dev/null; true");
        if pct > 0 {
            self.sh(
                &sw,
                &format!(
                    "nft add table bridge fbwanloss && nft add chain bridge fbwanloss f '{{ type filter hook forward priority 0; }}' && \
                     nft add rule bridge fbwanloss f iifname '{{ \"sw-wo\", \"sw-wc\" }}' numgen random mod 100 '<' {pct} drop"
                ),
            );
        }
    }

    /// Cuts the WAN (every frame dropped) or restores it.
    pub fn cut(&self, cut: bool) {
        let sw = self.lab.switch_ns().to_string();
        self.sh(&sw, "nft delete table bridge fbwancut 2>/dev/null; true");
        if cut {
            self.sh(
                &sw,
                "nft add table bridge fbwancut && nft add chain bridge fbwancut f '{ type filter hook forward priority -10; }' && \
                 nft add rule bridge fbwancut f iifname '{ \"sw-wo\", \"sw-wc\" }' drop",
            );
        }
    }

    /// Bytes the origin's WAN interface sent (headers and retransmissions included).
    pub fn origin_wan_tx(&self) -> u64 {
        self.sh(&self.origin_ns, "cat /sys/class/net/wan0/statistics/tx_bytes").trim().parse().unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.0.join(p)
    }

    fn spawn(&mut self, ns: &str, what: &str, args: &[&str], log: &str) -> u32 {
        let log_path = self.path(log);
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = self.lab.cmd(ns, "timeout");
        cmd.args(["900"]).args(args).env("RUST_LOG", std::env::var("FLEETBOOT_E2E_LOG").unwrap_or_else(|_| "info".into()));
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.lab.spawn(what, cmd).unwrap()
    }

    fn wait(&self, ns: &str, proto: Proto, port: u16, log: &str) {
        if let Err(e) = self.lab.wait_listening(ns, proto, port, Duration::from_secs(60)) {
            panic!("{e}\n{log}:\n{}", log_tail(&self.path(log)));
        }
    }

    /// The origin: `fleetboot serve` with `[origin]` listing the cache (`url` in explicit
    /// mode), and the origin's own DHCP for relayed requests when `dhcp` (transparent
    /// mode and the straight-to-origin runs). `extra`: more TOML (profiles...).
    pub fn start_origin(&mut self, mode: Mode, dhcp: bool, chunk: &str, extra: &str) {
        let url = match mode {
            Mode::Explicit => format!("url = \"http://{GATEWAY_LAN}:8080\"\n"),
            Mode::Transparent => String::new(),
        };
        let dhcp = if dhcp {
            format!(
                "[dhcp]\nmode = \"server\"\nauthoritative = true\n[[dhcp.subnet]]\nnetwork = \"10.77.0.0/24\"\n\
                 range = [\"10.77.0.100\", \"10.77.0.250\"]\nrouter = \"{GATEWAY_LAN}\"\nlease_time = 3600\n"
            )
        } else {
            "[dhcp]\nmode = \"off\"\n".into()
        };
        let text = format!(
            "data_dir = {data:?}\n[server]\naddress = \"{ORIGIN}\"\ninterface = \"wan0\"\nroot = {root:?}\n{dhcp}\
             [tftp]\nenabled = false\n[http]\nlisten = \"0.0.0.0:8080\"\n\
             [origin]\nlisten = \"0.0.0.0:8090\"\nchunk_size = \"{chunk}\"\nrescan_interval_s = 1\n\
             [[origin.cache]]\nname = \"branch1\"\nkey = \"{key}\"\n{url}\n{extra}\n\
             [[profile]]\nname = \"lab\"\npriority = 100\n\
             boot = {{ kind = \"linux\", kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"console=ttyS0 panic=-1 fleetboot.nonce={nonce}-{{mac_hyphen}}\" }}\n",
            data = self.path("origin-data"),
            root = self.path("root"),
            key = self.cache_key,
            nonce = self.nonce,
        );
        std::fs::write(self.path("origin.toml"), text).unwrap();
        let cfg = self.path("origin.toml").display().to_string();
        let ns = self.origin_ns.clone();
        self.origin_pid = Some(self.spawn(&ns, "origin", &[BIN, "serve", "--config", &cfg], "origin.log"));
        self.wait(&ns, Proto::Tcp, 8080, "origin.log");
        self.wait(&ns, Proto::Tcp, 8081, "origin.log");
        self.wait(&ns, Proto::Tcp, 8090, "origin.log");
    }

    /// The cache on the gateway; `origin` is the URL it fetches from (the origin's
    /// listener, or a relay in front of it). `extra`: more of `[cache]`. The origin
    /// timeout leaves room for TCP's SYN retransmissions at 1 s and 3 s: the WAN loses 1 %
    /// of packets, and with a shorter one a lost SYN and a lost retry (1 in a few thousand
    /// connections; a storm opens hundreds) took the origin for down.
    pub fn start_cache(&mut self, mode: Mode, origin: &str, extra: &str) {
        let transparent = if mode == Mode::Transparent { "transparent_listen = \"0.0.0.0:8081\"\n" } else { "" };
        let text = format!(
            "data_dir = {data:?}\n[server]\naddress = \"{GATEWAY_LAN}\"\n[dhcp]\nmode = \"off\"\n\
             [tftp]\nlisten = \"{GATEWAY_LAN}:69\"\n[http]\nlisten = \"{GATEWAY_LAN}:8080\"\n\
             [cache]\nname = \"branch1\"\norigin = \"{origin}\"\norigin_key = \"{key}\"\napi_listen = \"127.0.0.1:8091\"\n\
             origin_timeout_ms = 3500\n{transparent}{extra}\n",
            data = self.path("cache-data"),
            key = self.origin_key,
        );
        std::fs::write(self.path("cache.toml"), text).unwrap();
        let cfg = self.path("cache.toml").display().to_string();
        let ns = self.gw_ns.clone();
        self.cache_pid = Some(self.spawn(&ns, "cache", &[BIN, "cache", "--config", &cfg], "cache.log"));
        self.wait(&ns, Proto::Tcp, 8091, "cache.log");
        self.wait(&ns, Proto::Tcp, 8080, "cache.log");
        if mode == Mode::Transparent {
            self.wait(&ns, Proto::Tcp, 8081, "cache.log");
        }
    }

    pub fn stop_cache(&mut self) {
        if let Some(pid) = self.cache_pid.take() {
            self.lab.stop(pid, Duration::from_secs(5));
        }
    }

    /// The gateway diverts connections to the origin's HTTP port arriving from the branch
    /// to the cache's transparent listener (the documented TPROXY setup).
    pub fn tproxy(&self, port: u16) {
        self.sh(
            &self.gw_ns,
            &format!(
                "nft -f - <<'EOF'\ntable ip fleetboot_cache {{\n  chain divert {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
                 iifname \"srv0\" ip daddr {ORIGIN} tcp dport 8080 tproxy to :{port} meta mark set 0x1ca accept\n  }}\n}}\nEOF\n\
                 ip rule add fwmark 0x1ca lookup 202 && ip route add local 0.0.0.0/0 dev lo table 202"
            ),
        );
    }

    /// The branch's DHCP on the gateway: a server sending iPXE clients to `boot_url`, or
    /// (`relay`) a relay to the origin's DHCP.
    pub fn start_branch_dhcp(&mut self, boot_url: Option<&str>) {
        let leases = self.path("dnsmasq.leases").display().to_string();
        let mut args: Vec<String> = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--interface=srv0", "--bind-interfaces", "--log-facility=-"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(format!("--dhcp-leasefile={leases}"));
        args.push(format!("--pid-file={}", self.path("dnsmasq.pid").display()));
        match boot_url {
            Some(url) => {
                args.extend(
                    [
                        "--dhcp-range=10.77.0.100,10.77.0.250,255.255.255.0,1h",
                        "--dhcp-authoritative",
                        "--no-ping",
                        "--dhcp-userclass=set:ipxe,iPXE",
                        "--dhcp-option=tag:ipxe,encap:175,176,1b",
                        "--enable-ra",
                        "--dhcp-range=fd77::,ra-only,64",
                    ]
                    .iter()
                    .map(|s| s.to_string()),
                );
                args.push(format!("--dhcp-boot=tag:ipxe,{url}"));
            }
            None => args.push(format!("--dhcp-relay={GATEWAY_LAN},{ORIGIN}")),
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let ns = self.gw_ns.clone();
        self.dhcp_pid = Some(self.spawn(&ns, "dnsmasq", &refs, "dnsmasq.log"));
        self.wait(&ns, Proto::Udp, 67, "dnsmasq.log");
    }

    /// `fleetboot emulate` in the client namespace: the JSON report, and whether it exited 0.
    pub fn emulate(&self, clients: usize, mac_base: &str, expect: bool) -> (Value, bool) {
        let mut cmd = self.lab.cmd(&self.client.ns, "timeout");
        cmd.args(["600", BIN, "emulate", "--clients", &clients.to_string(), "--interface", "eth0", "--timeout", "500", "--json"])
            .args(["--mac-base", mac_base])
            .env("RUST_LOG", "warn");
        if expect {
            cmd.args(["--expect", &format!("vmlinuz={}", sha256_hex(&self.kernel))]);
            cmd.args(["--expect", &format!("initrd.gz={}", sha256_hex(&self.initrd))]);
        }
        let out = output_with_timeout(cmd, Duration::from_secs(700)).expect("running emulate");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); stderr:\n{}\ncache log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                log_tail(&self.path("cache.log"))
            )
        });
        (report, out.status.success())
    }

    /// Panics with the first failures unless every client booted with the exact bytes.
    pub fn assert_all_booted(&self, report: &Value, ok: bool, clients: usize) {
        let failures: Vec<&Value> = report["clients"].as_array().unwrap().iter().filter(|c| !c["error"].is_null()).take(5).collect();
        assert!(
            ok && report["succeeded"] == clients,
            "{} of {clients} booted; first failures: {failures:#?}\ncache log:\n{}",
            report["succeeded"],
            log_tail(&self.path("cache.log"))
        );
        for c in report["clients"].as_array().unwrap() {
            let checked: Vec<&Value> = c["files"].as_array().unwrap().iter().filter(|f| f["role"] == "kernel" || f["role"] == "initrd").collect();
            assert_eq!(checked.len(), 2, "{c:#}");
            for f in checked {
                assert_eq!(f["verified"], true, "{f:#}");
            }
        }
    }

    fn curl_json(&self, ns: &str, url: &str, method: &str) -> Value {
        self.curl_json_with(ns, url, method, "")
    }

    fn curl_json_with(&self, ns: &str, url: &str, method: &str, extra: &str) -> Value {
        let out = self.sh(ns, &format!("curl -sf -X {method} --max-time 60 {extra} {url}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{url}: {e}: {out}"))
    }

    /// `GET /api/cache` of the cache.
    pub fn cache_status(&self) -> Value {
        self.curl_json(&self.gw_ns, "http://127.0.0.1:8091/api/cache", "GET")
    }

    /// The cache's trace of a client.
    pub fn cache_trace(&self, mac: &str) -> Value {
        self.curl_json(&self.gw_ns, &format!("http://127.0.0.1:8091/api/trace/{mac}"), "GET")
    }

    /// `GET /api/origin` of the origin, on its operators' listener with the admin token
    /// it made at its first start.
    pub fn origin_status(&self) -> Value {
        let token = self.path("origin-data/admin.token");
        self.curl_json_with(&self.origin_ns, "http://127.0.0.1:8081/api/origin", "GET", &format!("-H \"Authorization: Bearer $(cat {})\"", token.display()))
    }

    /// (object bytes, manifest bytes, control bytes) the origin sent to the cache.
    pub fn origin_bytes(&self) -> (u64, u64, u64) {
        let s = &self.origin_status()["caches"][0]["stats"];
        (s["bytes_objects"].as_u64().unwrap(), s["bytes_manifests"].as_u64().unwrap(), s["bytes_control"].as_u64().unwrap())
    }

    /// The origin's row for the cache's copy of `name` version `v`.
    pub fn origin_state(&self, name: &str, v: u64) -> Option<String> {
        self.origin_status()["caches"][0]["holdings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name && h["version"] == v)
            .map(|h| h["state"].as_str().unwrap().to_string())
    }

    /// Waits (bounded: only a hang guard) until `check` holds.
    pub fn eventually(&self, what: &str, mut check: impl FnMut(&Wan) -> bool) {
        for _ in 0..600 {
            if check(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("never happened: {what}\ncache log:\n{}\norigin log:\n{}", log_tail(&self.path("cache.log")), log_tail(&self.path("origin.log")));
    }

    /// The SHA-256 of the kernel each client of a report received.
    pub fn kernels(report: &Value) -> Vec<String> {
        report["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["files"].as_array().unwrap().iter().find(|f| f["role"] == "kernel").map_or(String::new(), |f| f["sha256"].as_str().unwrap().to_string()))
            .collect()
    }

    pub fn unique_bytes(&self) -> u64 {
        (self.kernel.len() + self.initrd.len()) as u64
    }
}

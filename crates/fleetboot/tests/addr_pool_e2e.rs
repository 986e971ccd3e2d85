//! `fleetboot-addr` end to end: one client namespace whose single veth carries hundreds of
//! leased addresses, against `fleetboot serve` and against dnsmasq, each address carrying
//! a TCP connection and a UDP exchange to a peer that records the source it saw.
//!
//! ```text
//!   <lab>-srv: srv0 10.78.0.1/20 (+ the lab's 10.77.0.1/24)     <lab>-c0: eth0
//!     DHCP server (fleetboot serve | dnsmasq)       ── br0 ──     the process holding the
//!     peer: TCP + UDP echo on 10.78.0.1:7000                      addresses (this test
//!           (records every source address)                        binary, re-run as
//!                                                                 `hold_addresses`)
//! ```
//!
//! The process holding the addresses is this test binary run again inside the client
//! namespace (`--ignored --exact hold_addresses`), so it can be SIGKILLed. The error cases
//! run the pool in-process on a thread that entered the client namespace.
//!
//! Size: `FLEETBOOT_ADDR_CLIENTS` addresses (default 300, which fits CI's time and stays
//! clear of the kernel's neighbour table limit, `net.ipv4.neigh.default.gc_thresh3` = 1024
//! by default and shared by every namespace on the host; the peer needs one entry per
//! address). `FLEETBOOT_ADDR_CLIENTS=1000` is the full-size run.

mod common;

use common::{e2e_ready, TestDir, BIN};
use fleetboot_addr::{AddrError, AddrPool, DadConfig, DhcpSource, PoolConfig, Source};
use fleetboot_dhcp::codec::{opt, DhcpMessage, MessageType, BOOTREPLY, FLAG_BROADCAST};
use fleetboot_lab::netns::{ClientNs, Lab, Proto, CLIENT_IF};
use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use fleetboot_lab::netns::in_namespace;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const PEER_PORT: u16 = 7000;
const RANGE: (&str, &str) = ("10.78.1.0", "10.78.15.250");

fn clients() -> usize {
    std::env::var("FLEETBOOT_ADDR_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A lab with 10.78.0.1/20 on the server and one client namespace without an address.
struct World {
    lab: Lab,
    dir: TestDir,
    client: ClientNs,
}

impl World {
    fn new(name: &str) -> World {
        let mut lab = Lab::new().expect("creating the lab");
        let dir = TestDir::new(name);
        fleetboot_lab::netns::ip(&["-n", lab.server_ns(), "addr", "add", "10.78.0.1/20", "dev", "srv0"]).unwrap();
        let client = lab.add_client(None).expect("client namespace");
        World { lab, dir, client }
    }

    fn server_ns(&self) -> String {
        self.lab.server_ns().to_string()
    }

    /// `ip -o -4 addr show dev eth0` in the client namespace: the 10.78.x.x addresses,
    /// with their `valid_lft`.
    fn client_addresses(&self) -> Vec<(Ipv4Addr, String)> {
        let out = self
            .lab
            .exec(&self.client.ns, &["ip", "-o", "-4", "addr", "show", "dev", CLIENT_IF], Duration::from_secs(10));
        let Ok(out) = out else { return Vec::new() }; // the interface may be gone
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let ip: Ipv4Addr = w.by_ref().skip_while(|t| *t != "inet").nth(1)?.split('/').next()?.parse().ok()?;
                let valid = l.split("valid_lft ").nth(1)?.split_whitespace().next()?.to_string();
                (ip.octets()[..2] == [10, 78]).then_some((ip, valid))
            })
            .collect()
    }

    /// `fleetboot serve` in the server namespace handing out `range` for `lease` seconds.
    fn start_fleetboot(&mut self, range: (&str, &str), lease: u32) {
        let config = self.dir.join("fb.toml");
        std::fs::create_dir_all(self.dir.join("root")).unwrap();
        std::fs::write(
            &config,
            format!(
                r##"data_dir = "{data}"

[server]
address = "10.78.0.1"
interface = "srv0"
root = "{root}"

[dhcp]
mode = "server"

[[dhcp.subnet]]
network = "10.78.0.0/20"
range = ["{lo}", "{hi}"]
lease_time = {lease}

[pxe]
transport = "http"

[tftp]
enabled = false

[http]
enabled = true
listen = "10.78.0.1:8080"

[[profile]]
name = "everyone"
priority = 1000
boot = {{ kind = "script", script = "#!ipxe\necho booted from one of many addresses" }}
"##,
                data = self.dir.join("data").display(),
                root = self.dir.join("root").display(),
                lo = range.0,
                hi = range.1,
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.join("fleetboot.log")).unwrap();
        let mut cmd = self.lab.cmd(self.lab.server_ns(), "timeout");
        cmd.args(["-s", "TERM", "-k", "10", "900", BIN, "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.lab.spawn("fleetboot", cmd).expect("starting fleetboot");
        let ns = self.server_ns();
        for (proto, port) in [(Proto::Udp, 67), (Proto::Tcp, 8080)] {
            self.lab
                .wait_listening(&ns, proto, port, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("fleetboot did not come up: {e:#}\n{}", self.log("fleetboot.log")));
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Every lease fleetboot has, by `GET /api/leases` on its admin listener (loopback of
    /// the server's namespace) with the token its first start wrote.
    fn fleetboot_leases(&self) -> serde_json::Value {
        let token = std::fs::read_to_string(self.dir.join("data/admin.token")).expect("fleetboot's bootstrap token");
        let auth = format!("Authorization: Bearer {}", token.trim());
        let out = self
            .lab
            .exec(&self.server_ns(), &["curl", "-sS", "--max-time", "20", "-H", &auth, "http://127.0.0.1:8081/api/leases"], Duration::from_secs(30))
            .expect("GET /api/leases");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("leases JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Leases fleetboot holds bound and unexpired.
    fn fleetboot_bound(&self) -> Vec<Ipv4Addr> {
        let leases = self.fleetboot_leases();
        let now = unix_now();
        leases
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["state"] == "bound" && l["expires_at"].as_u64().is_some_and(|t| t > now))
            .filter_map(|l| l["ip"].as_str()?.parse().ok())
            .collect()
    }

    /// dnsmasq in the server namespace handing out `range` for `lease` (dnsmasq's form,
    /// e.g. "2m"); its lease file is `dnsmasq.leases`.
    fn start_dnsmasq(&mut self, range: (&str, &str), lease: &str) {
        let mut cmd = self.lab.cmd(self.lab.server_ns(), "timeout");
        cmd.args(["-k", "5", "900", "dnsmasq", "--no-daemon", "--port=0", "--interface=srv0", "--bind-interfaces"])
            .arg(format!("--dhcp-range={},{},255.255.240.0,{lease}", range.0, range.1))
            .arg(format!("--dhcp-leasefile={}", self.dir.join("dnsmasq.leases").display()))
            .args(["--dhcp-lease-max=10000", "--no-ping", "--dhcp-authoritative", "--conf-file=/dev/null"])
            .arg(format!("--pid-file={}", self.dir.join("dnsmasq.pid").display()))
            .arg(format!("--log-facility={}", self.dir.join("dnsmasq.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("dnsmasq.err")).unwrap());
        self.lab.spawn("dnsmasq", cmd).expect("starting dnsmasq");
        self.lab
            .wait_listening(&self.server_ns(), Proto::Udp, 67, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("dnsmasq did not come up: {e:#}\n{}", self.log("dnsmasq.err")));
    }

    /// Unexpired leases in dnsmasq's lease file (`EXPIRY MAC IP NAME CLIENT-ID` lines).
    fn dnsmasq_bound(&self) -> Vec<Ipv4Addr> {
        let now = unix_now();
        self.log("dnsmasq.leases")
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let expiry: u64 = w.next()?.parse().ok()?;
                let ip = w.nth(1)?.parse().ok()?;
                (expiry > now).then_some(ip)
            })
            .collect()
    }
}

/// A TCP and UDP echo service on 10.78.0.1:7000 in the server namespace that records every
/// source address it saw.
struct Peer {
    tcp: Arc<Mutex<HashSet<Ipv4Addr>>>,
    udp: Arc<Mutex<HashSet<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Peer {
    fn start(ns: &str) -> Peer {
        let (tcp, udp) = (Arc::new(Mutex::new(HashSet::new())), Arc::new(Mutex::new(HashSet::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (seen, halt, ready) = (tcp.clone(), stop.clone(), ready_tx.clone());
        let t1 = in_namespace(ns, move || {
            let l = TcpListener::bind((SERVER, PEER_PORT)).expect("peer TCP bind");
            l.set_nonblocking(true).unwrap();
            ready.send(()).unwrap();
            while !halt.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = [0u8; 256];
                        if let Ok(n) = s.read(&mut buf) {
                            let _ = s.write_all(&buf[..n]);
                        }
                        if let SocketAddr::V4(v4) = from {
                            seen.lock().unwrap().insert(*v4.ip());
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        let (seen, halt) = (udp.clone(), stop.clone());
        let t2 = in_namespace(ns, move || {
            let u = UdpSocket::bind((SERVER, PEER_PORT)).expect("peer UDP bind");
            u.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !halt.load(Ordering::Relaxed) {
                if let Ok((n, SocketAddr::V4(from))) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], from);
                    seen.lock().unwrap().insert(*from.ip());
                }
            }
        });
        for _ in 0..2 {
            ready_rx.recv_timeout(Duration::from_secs(10)).expect("peer up");
        }
        Peer { tcp, udp, stop, threads: vec![t1, t2] }
    }

    fn sources(&self) -> (HashSet<Ipv4Addr>, HashSet<Ipv4Addr>) {
        (self.tcp.lock().unwrap().clone(), self.udp.lock().unwrap().clone())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The holder process: this test binary running `hold_addresses` in the client namespace.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Holder {
    fn start(w: &World, count: usize, then: &str, release_rate: u32) -> Holder {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = w.lab.cmd(&w.client.ns, exe);
        cmd.args(["--exact", "hold_addresses", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("FLEETBOOT_ADDR_HOLD", format!("{count} {SERVER}:{PEER_PORT} {then} {release_rate}"))
            .env("RUST_LOG", std::env::var("FLEETBOOT_ADDR_HOLDER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(w.dir.join("holder.err")).unwrap());
        let mut child = w.lab.spawn_tracked(&mut cmd).expect("starting the holder");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                // libtest may have printed `test hold_addresses ... ` on the same line.
                if let Some((_, rest)) = line.split_once("HOLDER ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        Holder { child, lines, log }
    }

    /// The next `HOLDER WORD ...` line starting with `word`, within `limit`.
    fn expect(&mut self, word: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(word) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no `HOLDER {word}` line within {limit:?}; holder said:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
            }
        }
    }

    fn tell(&mut self, what: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{what}").unwrap();
        stdin.flush().unwrap();
    }
}

/// `key=value` from a holder line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn ips(line: &str) -> BTreeSet<Ipv4Addr> {
    field(line, "ips").split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

/// The pool configuration of the error cases: quick ARP probes, and a client that gives
/// up after 4 DISCOVERs (0.5 + 1 + 2 + 2 s).
fn lab_pool(interface: &str) -> PoolConfig {
    let mut cfg = PoolConfig::dhcp(interface);
    cfg.dad = Some(DadConfig::quick());
    cfg.source = Source::Dhcp(DhcpSource {
        initial_timeout: Duration::from_millis(500),
        max_timeout: Duration::from_secs(2),
        discover_attempts: 4,
        ..DhcpSource::default()
    });
    cfg
}

/// The holder's: as patient as a real client (8 DISCOVERs over ~20 s), because a single
/// threaded server on a busy 2-core machine drops bursts of a thousand DISCOVERs
/// (dnsmasq lost 50 of 1048 in one such run).
fn patient_pool(interface: &str) -> PoolConfig {
    let mut cfg = lab_pool(interface);
    if let Source::Dhcp(d) = &mut cfg.source {
        d.discover_attempts = 8;
        d.max_timeout = Duration::from_secs(4);
    }
    cfg
}

/// Not a test on its own: the process that holds the addresses for the tests above, run
/// by them in the client namespace with `FLEETBOOT_ADDR_HOLD="COUNT PEER THEN"`. Leases
/// COUNT addresses at once, talks TCP and UDP to PEER from each, prints `HOLDER ready`,
/// then either releases everything when told (`THEN` = `release`) or keeps the leases,
/// printing `HOLDER renewed N` as renewals come, until it is killed (`wait`).
#[test]
#[ignore = "run by the other tests of this file, in their client namespace"]
fn hold_addresses() {
    let spec = std::env::var("FLEETBOOT_ADDR_HOLD").expect("FLEETBOOT_ADDR_HOLD (run by the tests of this file)");
    let mut w = spec.split_whitespace();
    let count: usize = w.next().unwrap().parse().unwrap();
    let peer: SocketAddr = w.next().unwrap().parse().unwrap();
    let then = w.next().unwrap().to_string();
    let release_rate: u32 = w.next().unwrap().parse().unwrap();
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut cfg = patient_pool(CLIENT_IF);
        cfg.release_rate = release_rate;
        let pool = AddrPool::start(cfg).expect("starting the pool");
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..count)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let addr = pool.lease().await.map_err(|e| e.to_string())?;
                    let line = format!("hello from {}\n", addr.ip());
                    let mut tcp = addr.tcp_connect(peer).await.map_err(|e| format!("TCP: {e}"))?;
                    assert_eq!(tcp.local_addr().unwrap().ip(), std::net::IpAddr::V4(addr.ip()));
                    tcp.write_all(line.as_bytes()).await.map_err(|e| format!("TCP: {e}"))?;
                    let mut back = vec![0u8; line.len()];
                    tcp.read_exact(&mut back).await.map_err(|e| format!("TCP echo: {e}"))?;
                    let udp = addr.udp(0).map_err(|e| format!("UDP: {e}"))?;
                    let mut buf = [0u8; 256];
                    let mut echoed = false;
                    for _ in 0..10 {
                        udp.send_to(line.as_bytes(), peer).await.map_err(|e| format!("UDP: {e}"))?;
                        if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(500), udp.recv_from(&mut buf)).await {
                            echoed = buf[..n] == *line.as_bytes();
                            break;
                        }
                    }
                    if !echoed {
                        return Err("no UDP echo".to_string());
                    }
                    Ok((addr, tcp, udp))
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut errors = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(h) => held.push(h),
                Err(e) => errors.push(e),
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let list: Vec<String> = held.iter().map(|(a, _, _)| a.ip().to_string()).collect();
        println!(
            "HOLDER ready leased={} failed={} secs={secs:.3} rate={:.1} errors={:?} ips={}",
            held.len(),
            errors.len(),
            held.len() as f64 / secs,
            errors.iter().take(3).collect::<Vec<_>>(),
            list.join(",")
        );
        if then == "release" {
            let mut line = String::new();
            let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
            let t1 = Instant::now();
            drop(held);
            pool.idle().await;
            let left = pool.installed().unwrap().iter().filter(|a| a.ip.octets()[..2] == [10, 78]).count();
            println!("HOLDER released left={left} secs={:.3} stats={:?}", t1.elapsed().as_secs_f64(), pool.stats());
        } else {
            let mut last = 0;
            for _ in 0..600 {
                let renewed = pool.stats().renewed;
                if renewed != last {
                    println!("HOLDER renewed n={renewed}");
                    last = renewed;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop(held);
        }
    });
}

/// Leases `n` addresses in the holder, checks each carried a TCP connection and a UDP
/// exchange seen by the peer from that very address, that all are on the interface with
/// the lease's lifetime, then releases them: nothing left on the interface, nothing
/// bound at the server (`bound` reads the server's own records).
fn lease_use_release(w: &mut World, lease_secs: u64, release_rate: u32, bound: impl Fn(&World) -> Vec<Ipv4Addr>) {
    let n = clients();
    let peer = Peer::start(&w.server_ns());
    let mut holder = Holder::start(w, n, "release", release_rate);
    let ready = holder.expect("ready", Duration::from_secs(120));
    eprintln!("{}", ready.split(" ips=").next().unwrap());
    assert_eq!(field(&ready, "leased"), n.to_string(), "{ready}");
    let leased = ips(&ready);
    assert_eq!(leased.len(), n, "distinct addresses");

    let (tcp, udp) = peer.sources();
    let tcp: BTreeSet<_> = tcp.into_iter().collect();
    let udp: BTreeSet<_> = udp.into_iter().collect();
    assert_eq!(tcp, leased, "the peer saw a TCP connection from every leased address and no other");
    assert_eq!(udp, leased, "the peer saw a UDP datagram from every leased address and no other");

    let installed = w.client_addresses();
    assert_eq!(installed.len(), n, "every address is on {CLIENT_IF}");
    for (ip, valid) in &installed {
        assert!(leased.contains(ip), "{ip} on the interface but not leased");
        let secs: u64 = valid.trim_end_matches("sec").parse().unwrap_or_else(|_| panic!("{ip} valid_lft {valid}: not the lease's"));
        assert!(secs <= lease_secs, "{ip}: valid_lft {secs} s outlives the {lease_secs} s lease");
    }
    // dnsmasq rewrites its lease file in place: read it until it is whole.
    let mut at_server: BTreeSet<_> = bound(w).into_iter().collect();
    for _ in 0..50 {
        if leased.is_subset(&at_server) {
            break;
        }
        thread::sleep(Duration::from_millis(200));
        at_server = bound(w).into_iter().collect();
    }
    assert!(leased.is_subset(&at_server), "the server has every address bound ({} of {n})", leased.intersection(&at_server).count());

    holder.tell("release");
    let released = holder.expect("released", Duration::from_secs(60 + n as u64 / release_rate as u64));
    eprintln!("{released}");
    assert_eq!(field(&released, "left"), "0", "{released}");
    assert!(holder.child.wait().unwrap().success(), "the holder failed");
    w.lab.untrack(holder.child.id());
    assert!(w.client_addresses().is_empty(), "addresses left on {CLIENT_IF}: {:?}", w.client_addresses());
    let mut left = bound(w);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
        left = bound(w);
    }
    assert!(left.is_empty(), "{} leases still bound at the server after the releases: {:?}", left.len(), &left[..left.len().min(10)]);
}

#[test]
fn addresses_leased_used_and_released_against_fleetboot() {
    if !e2e_ready("addresses_leased_used_and_released_against_fleetboot", &[]) {
        return;
    }
    let mut w = World::new("addr-fleetboot");
    w.start_fleetboot(RANGE, 120);
    lease_use_release(&mut w, 120, 1000, World::fleetboot_bound);
}

#[test]
fn addresses_leased_used_and_released_against_dnsmasq() {
    if !e2e_ready("addresses_leased_used_and_released_against_dnsmasq", &["dnsmasq"]) {
        return;
    }
    let mut w = World::new("addr-dnsmasq");
    w.start_dnsmasq(RANGE, "2m");
    // dnsmasq rewrites its whole lease file for every RELEASE: at 1000/s a thousand of
    // them overflow its socket (it kept 808 leases); 150/s is within what it does here.
    lease_use_release(&mut w, 120, 150, World::dnsmasq_bound);
}

/// SIGKILL of the process holding the addresses: nothing runs its cleanup, yet once the
/// leases end the addresses are gone from the interface (the kernel's lifetime) and the
/// server holds nothing (its expiry). Before the kill the leases are renewed at T1, which
/// pushes the kernel's lifetime out again.
#[test]
fn killed_holder_leaves_nothing_once_the_leases_end() {
    if !e2e_ready("killed_holder_leaves_nothing_once_the_leases_end", &[]) {
        return;
    }
    let n = clients().min(100);
    let mut w = World::new("addr-killed");
    w.start_fleetboot(RANGE, 60);
    let _peer = Peer::start(&w.server_ns());
    let mut holder = Holder::start(&w, n, "wait", 1000);
    let ready = holder.expect("ready", Duration::from_secs(120));
    assert_eq!(field(&ready, "leased"), n.to_string(), "{ready}");
    let leased = ips(&ready);
    let bound_at = Instant::now();
    // T1 is 30 s: every lease renews once.
    loop {
        let line = holder.expect("renewed", Duration::from_secs(60));
        if field(&line, "n").parse::<usize>().unwrap() >= n {
            break;
        }
    }
    // Every address was installed with 60 s before `bound_at`: one not renewed has at most
    // 60 s less the time since then left. A renewal (at ~30 s into its lease) set it back
    // to ~60 s, less however much earlier than the last lease it was bound.
    let unrenewed_at_most = 60u64.saturating_sub(bound_at.elapsed().as_secs());
    let installed = w.client_addresses();
    assert_eq!(installed.len(), n);
    for (ip, valid) in &installed {
        let secs: u64 = valid.trim_end_matches("sec").parse().unwrap();
        assert!(secs > unrenewed_at_most + 2 && secs <= 60, "{ip}: valid_lft {secs} s after the renewal (not renewed: at most {unrenewed_at_most} s)");
    }
    holder.child.kill().unwrap(); // SIGKILL
    holder.child.wait().unwrap();
    w.lab.untrack(holder.child.id());
    let killed_at = Instant::now();
    assert_eq!(w.client_addresses().len(), n, "the addresses outlive the process until their leases end");
    let bound: BTreeSet<_> = w.fleetboot_bound().into_iter().collect();
    assert!(leased.is_subset(&bound), "the server still holds the leases");

    // The renewed leases end ~60 s after the renewal; allow 20 s more.
    let deadline = killed_at + Duration::from_secs(80);
    while !w.client_addresses().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
    }
    let left = w.client_addresses();
    assert!(left.is_empty(), "{} addresses still on {CLIENT_IF} {:?} after their leases ended", left.len(), &left[..left.len().min(5)]);
    while !w.fleetboot_bound().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
    }
    assert!(w.fleetboot_bound().is_empty(), "leases still bound at fleetboot after expiry");
    eprintln!(
        "killed {:.1} s after binding; addresses and leases gone {:.1} s after the kill",
        killed_at.duration_since(bound_at).as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );
}

/// Runs an async block on a 2-thread runtime inside the client namespace.
fn in_client<T: Send + 'static>(w: &World, f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    in_namespace(&w.client.ns, move || {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
    })
    .join()
    .expect("the client thread panicked")
}

/// A DHCP server written for failing: offers every DISCOVER, then NAKs every REQUEST
/// (`nak_renewals` false) or ACKs the first REQUEST of each client with a 4-second lease
/// and NAKs its renewal (`nak_renewals` true). Runs until `stop`; returns how many
/// transactions it NAKed.
fn refusing_server(ns: &str, nak_renewals: bool, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = in_namespace(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(b"srv0")).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)).into()).unwrap();
        let u: UdpSocket = s.into();
        u.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        ready_tx.send(()).unwrap();
        // NAKed transactions, not NAKs: a REQUEST the client sent again because the answer
        // was slow is the same transaction (its xid), and would be NAKed twice.
        let (mut buf, mut naks, mut next) = ([0u8; 1500], HashSet::new(), 10u8);
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, _)) = u.recv_from(&mut buf) else { continue };
            let Ok(req) = DhcpMessage::parse(&buf[..n]) else { continue };
            let mut reply = DhcpMessage { op: BOOTREPLY, xid: req.xid, flags: FLAG_BROADCAST, chaddr: req.chaddr, ..DhcpMessage::default() };
            reply.set_option(opt::SERVER_ID, SERVER.octets().to_vec());
            let renewal = !req.ciaddr.is_unspecified();
            match req.message_type() {
                Some(MessageType::Discover) => {
                    reply.yiaddr = Ipv4Addr::new(10, 78, 3, next);
                    next = next.wrapping_add(1);
                    reply.set_option(opt::MESSAGE_TYPE, vec![MessageType::Offer as u8]);
                    reply.set_option(opt::LEASE_TIME, 4u32.to_be_bytes().to_vec());
                    reply.set_option(opt::SUBNET_MASK, vec![255, 255, 240, 0]);
                }
                Some(MessageType::Request) if nak_renewals && !renewal => {
                    reply.yiaddr = req.requested_ip().unwrap();
                    reply.set_option(opt::MESSAGE_TYPE, vec![MessageType::Ack as u8]);
                    reply.set_option(opt::LEASE_TIME, 4u32.to_be_bytes().to_vec());
                    reply.set_option(opt::SUBNET_MASK, vec![255, 255, 240, 0]);
                }
                Some(MessageType::Request) => {
                    naks.insert(req.xid);
                    reply.set_option(opt::MESSAGE_TYPE, vec![MessageType::Nak as u8]);
                    reply.set_option(opt::MESSAGE, b"not yours".to_vec());
                }
                _ => continue,
            }
            let _ = u.send_to(&reply.encode(), (Ipv4Addr::BROADCAST, 68));
        }
        naks.len()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("refusing server up");
    h
}

/// Pool exhausted (DHCP and static), the limit on held addresses, no server at all: each
/// a clear error, and nothing left on the interface.
#[test]
fn exhausted_pools_and_silent_servers_are_clear_errors() {
    if !e2e_ready("exhausted_pools_and_silent_servers_are_clear_errors", &[]) {
        return;
    }
    let mut w = World::new("addr-exhausted");
    // No server yet: nobody answers.
    let silent = in_client(&w, async {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        // One DHCP client per interface: a second would steal the first's unicast replies.
        let second = AddrPool::start(lab_pool(CLIENT_IF)).err().map(|e| e.to_string());
        assert!(second.as_deref().is_some_and(|e| e.contains("binding UDP port 68")), "{second:?}");
        let e = pool.lease().await.expect_err("no server, no address");
        let left = pool.installed().unwrap().len();
        drop(pool);
        // Port 68 is free again once the pool is gone: its receiver is cancelled on
        // another worker, which may not have run yet, so the new pool may wait a turn.
        let mut again = AddrPool::start(lab_pool(CLIENT_IF));
        for _ in 0..100 {
            if again.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            again = AddrPool::start(lab_pool(CLIENT_IF));
        }
        again.expect("a new pool after the first");
        (e.to_string(), matches!(e, AddrError::Dhcp(_)), left)
    });
    assert!(silent.1 && silent.0.contains("no DHCPOFFER after 4 DHCPDISCOVERs"), "{}", silent.0);
    assert_eq!(silent.2, 0, "nothing installed");

    // Three addresses at the server: the fourth lease fails.
    w.start_fleetboot(("10.78.1.0", "10.78.1.2"), 120);
    let (held, fourth, during, after) = in_client(&w, async {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.lease().await.expect("one of three"));
        }
        let fourth = pool.lease().await.expect_err("the server's pool is exhausted").to_string();
        let during = pool.installed().unwrap().len();
        let ips: Vec<Ipv4Addr> = held.iter().map(|a| a.ip()).collect();
        drop(held);
        pool.idle().await;
        (ips, fourth, during, pool.installed().unwrap().len())
    });
    assert_eq!(held.len(), 3);
    assert!(fourth.contains("no DHCPOFFER") && fourth.contains("exhausted"), "{fourth}");
    assert_eq!((during, after), (3, 0), "only the three leases were ever on the interface");
    assert!(w.client_addresses().is_empty());

    // A static range of two, and a limit of one held address.
    let (third, limited) = in_client(&w, async {
        let mut cfg = PoolConfig::static_range(CLIENT_IF, Ipv4Addr::new(10, 78, 2, 0), Ipv4Addr::new(10, 78, 2, 1), 20);
        cfg.dad = Some(DadConfig::quick());
        let pool = AddrPool::start(cfg.clone()).unwrap();
        let a = pool.lease().await.unwrap();
        // Code without a runtime of its own: a blocking lease, a blocking socket.
        let b = tokio::task::spawn_blocking({
            let pool = pool.clone();
            move || {
                let b = pool.lease_blocking().unwrap();
                let udp = b.std_udp(0).unwrap();
                assert_eq!(udp.local_addr().unwrap().ip(), std::net::IpAddr::V4(b.ip()));
                b
            }
        })
        .await
        .unwrap();
        assert_ne!(a.ip(), b.ip());
        let third = pool.lease().await.expect_err("range of two");
        drop((a, b));
        pool.idle().await;
        cfg.max_leases = 1;
        let pool = AddrPool::start(cfg).unwrap();
        let one = pool.lease().await.unwrap();
        let limited = pool.lease().await.expect_err("limit of one");
        drop(one);
        pool.idle().await;
        (third.to_string(), limited.to_string())
    });
    assert_eq!(third, "the static range 10.78.2.0-10.78.2.1 is exhausted");
    assert!(limited.contains("1 addresses are held already"), "{limited}");
    assert!(w.client_addresses().is_empty());
}

/// A server that NAKs every REQUEST: a clear error. A server that NAKs the renewal: the
/// lease is lost, its socket fails with the reason, the address leaves the interface.
#[test]
fn naks_are_clear_errors_and_close_the_sockets() {
    if !e2e_ready("naks_are_clear_errors_and_close_the_sockets", &[]) {
        return;
    }
    let w = World::new("addr-nak");
    let stop = Arc::new(AtomicBool::new(false));
    let server = refusing_server(&w.server_ns(), false, stop.clone());
    let (e, left) = in_client(&w, async {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        let e = pool.lease().await.expect_err("every REQUEST is NAKed");
        (e.to_string(), pool.installed().unwrap().len())
    });
    stop.store(true, Ordering::Relaxed);
    let naks = server.join().unwrap();
    assert!(e.contains("gave up after 3 restarts") && e.contains("DHCPNAK: not yours"), "{e}");
    assert_eq!(naks, 4, "one REQUEST transaction per round, 1 + 3 restarts");
    assert_eq!(left, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let server = refusing_server(&w.server_ns(), true, stop.clone());
    let (ip, recv_error, lost, installed_while_held) = in_client(&w, async {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        let addr = pool.lease().await.expect("the first REQUEST is ACKed");
        let installed = pool.installed().unwrap().len();
        let udp = addr.udp(0).unwrap();
        let mut buf = [0u8; 16];
        // Nothing will arrive: the wait ends when the renewal (T1 = 2 s) is NAKed.
        let r = tokio::time::timeout(Duration::from_secs(10), udp.recv_from(&mut buf)).await.expect("the lost lease ends the wait");
        let err = r.expect_err("a lost lease is an error");
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<fleetboot_addr::LeaseLost>()).cloned();
        let again = addr.udp(0).err().map(|e| e.to_string());
        (addr.ip(), err.to_string(), (inner, again), installed)
    });
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(installed_while_held, 1);
    assert!(recv_error.contains(&format!("the lease on {ip} was lost")) && recv_error.contains("DHCPNAK while renewing: not yours"), "{recv_error}");
    assert_eq!(lost.0.map(|l| l.ip), Some(ip), "the io::Error carries LeaseLost");
    assert!(lost.1.is_some_and(|e| e.contains("was lost")), "no new socket on a lost lease");
    assert!(w.client_addresses().is_empty(), "the lost address left the interface");
}

/// Addresses someone else already uses are declined (DHCP: DHCPDECLINE, the server sets
/// the address aside) or skipped (static), and never installed.
#[test]
fn addresses_in_use_are_declined_or_skipped() {
    if !e2e_ready("addresses_in_use_are_declined_or_skipped", &[]) {
        return;
    }
    let mut w = World::new("addr-conflict");
    // The server namespace squats on the first address of each range.
    for squat in ["10.78.1.0/20", "10.78.2.0/20"] {
        fleetboot_lab::netns::ip(&["-n", &w.server_ns(), "addr", "add", squat, "dev", "srv0"]).unwrap();
    }
    w.start_fleetboot(("10.78.1.0", "10.78.1.9"), 120);
    let (dhcp_ip, static_ip, conflicts) = in_client(&w, async {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        let a = pool.lease().await.expect("another address after the DECLINE");
        let mut cfg = PoolConfig::static_range(CLIENT_IF, Ipv4Addr::new(10, 78, 2, 0), Ipv4Addr::new(10, 78, 2, 9), 20);
        cfg.dad = Some(DadConfig::quick());
        let statics = AddrPool::start(cfg).unwrap();
        let b = statics.lease().await.expect("the next static address");
        (a.ip(), b.ip(), (pool.stats().conflicts, statics.stats().conflicts))
    });
    assert_eq!(static_ip, Ipv4Addr::new(10, 78, 2, 1));
    assert_ne!(dhcp_ip, Ipv4Addr::new(10, 78, 1, 0));
    assert_eq!(conflicts, (1, 1));
    let leases = w.fleetboot_leases();
    assert!(
        leases.as_array().unwrap().iter().any(|l| l["ip"] == "10.78.1.0" && l["state"] == "declined"),
        "fleetboot set the declined address aside: {leases}"
    );
}

/// The interface disappears under held and pending leases: held sockets fail with the
/// reason, pending and later leases fail with `InterfaceGone`.
#[test]
fn a_vanished_interface_is_a_clear_error() {
    if !e2e_ready("a_vanished_interface_is_a_clear_error", &[]) {
        return;
    }
    let w = World::new("addr-vanish");
    let ns = w.client.ns.clone();
    let (held_err, pending_err, later_err) = in_client(&w, async move {
        let mut cfg = PoolConfig::static_range(CLIENT_IF, Ipv4Addr::new(10, 78, 2, 0), Ipv4Addr::new(10, 78, 2, 9), 20);
        cfg.dad = Some(DadConfig::quick());
        let statics = AddrPool::start(cfg).unwrap();
        let held = statics.lease().await.unwrap();
        let udp = held.udp(0).unwrap();
        let dhcp = AddrPool::start(lab_pool(CLIENT_IF)).unwrap(); // no server: stays pending
        let pending = tokio::spawn({
            let dhcp = dhcp.clone();
            async move { dhcp.lease().await.map(|a| a.ip()) }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        fleetboot_lab::netns::ip(&["-n", &ns, "link", "del", CLIENT_IF]).unwrap();
        let mut buf = [0u8; 8];
        let held_err = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf)).await.expect("woken").unwrap_err().to_string();
        let pending_err = pending.await.unwrap().unwrap_err().to_string();
        let later_err = statics.lease().await.unwrap_err().to_string();
        (held_err, pending_err, later_err)
    });
    assert!(held_err.contains("was lost: interface eth0 disappeared"), "{held_err}");
    assert_eq!(pending_err, "interface eth0 disappeared");
    assert_eq!(later_err, "interface eth0 disappeared");
}

/// An emulated client leases as itself: its MAC and iPXE identity reach the server, and
/// the boot file the server answered comes back with the address.
#[test]
fn a_lease_can_carry_an_emulated_clients_identity() {
    if !e2e_ready("a_lease_can_carry_an_emulated_clients_identity", &["curl"]) {
        return;
    }
    let mut w = World::new("addr-lease-as");
    w.start_fleetboot(RANGE, 120);
    let mac = fleetboot_boot::MacAddr([0x52, 0x54, 0x00, 0x78, 0x00, 0x42]);
    let (ip, origin) = in_client(&w, async move {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        let mut client = fleetboot_addr::ClientConfig::ipxe(mac, [0x42; 16]);
        client.initial_timeout = Duration::from_millis(500);
        let addr = pool.lease_as(client).await.expect("leased as the iPXE client");
        let got = (addr.ip(), addr.origin().clone());
        drop(addr);
        pool.idle().await; // the RELEASE is sent from the pool's runtime
        got
    });
    let fleetboot_addr::Origin::Dhcp { binding, chaddr, .. } = origin else { panic!("{origin:?}") };
    assert_eq!((binding.ip, chaddr), (ip, mac.0));
    let file = binding.boot_file.unwrap_or_default();
    assert!(file.ends_with(&format!("/boot/{}.ipxe", mac.hyphenated())), "{file}");
    let leases = w.fleetboot_leases();
    let ip_s = ip.to_string();
    let lease = leases.as_array().unwrap().iter().find(|l| l["ip"].as_str() == Some(ip_s.as_str()));
    // Released: the server no longer lists it.
    assert!(lease.is_none(), "released: {leases}");
}

/// The ProxyDHCP server of [`a_proxydhcp_offer_after_the_ack_reaches_the_observer`]: 10.78.0.9.
const LATE_PROXY: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 9);

/// A DHCP server and a slower ProxyDHCP server in one: OFFERs 10.78.3.10 to the DISCOVER,
/// ACKs the REQUEST with a 120-second lease, and only then sends the ProxyDHCP offer that
/// answers the DISCOVER (no address, option 60 `PXEClient`, server id [`LATE_PROXY`]) —
/// what a PXE ROM hears when the ProxyDHCP server is a few milliseconds slower than the
/// DHCP server's whole exchange. Returns the ProxyDHCP offers sent.
fn late_proxy_server(ns: &str, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = in_namespace(ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(b"srv0")).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 67)).into()).unwrap();
        let u: UdpSocket = s.into();
        u.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        ready_tx.send(()).unwrap();
        let (mut buf, mut proxied) = ([0u8; 1500], 0);
        let mut discovers = std::collections::HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, _)) = u.recv_from(&mut buf) else { continue };
            let Ok(req) = DhcpMessage::parse(&buf[..n]) else { continue };
            let reply = |mt: MessageType, yiaddr: Ipv4Addr, server: Ipv4Addr| {
                let mut r = DhcpMessage { op: BOOTREPLY, xid: req.xid, flags: FLAG_BROADCAST, chaddr: req.chaddr, yiaddr, ..DhcpMessage::default() };
                r.set_option(opt::MESSAGE_TYPE, vec![mt as u8]);
                r.set_option(opt::SERVER_ID, server.octets().to_vec());
                if !yiaddr.is_unspecified() {
                    r.set_option(opt::LEASE_TIME, 120u32.to_be_bytes().to_vec());
                    r.set_option(opt::SUBNET_MASK, vec![255, 255, 240, 0]);
                }
                r
            };
            let mut out = Vec::new();
            match req.message_type() {
                Some(MessageType::Discover) => {
                    discovers.insert(req.xid, req.clone());
                    out.push(reply(MessageType::Offer, Ipv4Addr::new(10, 78, 3, 10), SERVER));
                }
                Some(MessageType::Request) => {
                    out.push(reply(MessageType::Ack, Ipv4Addr::new(10, 78, 3, 10), SERVER));
                    if discovers.remove(&req.xid).is_some() {
                        let mut proxy = reply(MessageType::Offer, Ipv4Addr::UNSPECIFIED, LATE_PROXY);
                        proxy.set_option(opt::VENDOR_CLASS, b"PXEClient".to_vec());
                        out.push(proxy);
                        proxied += 1;
                    }
                }
                _ => continue,
            }
            for r in out {
                let _ = u.send_to(&r.encode(), (Ipv4Addr::BROADCAST, 68));
            }
        }
        proxied
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("late proxy server up");
    h
}

/// A ProxyDHCP offer that arrives after the DHCP server's ACK is not on the binding the
/// lease was delivered with, but the lease's observer is told of it (the emulated PXE ROM
/// waits for exactly this before it picks its boot server; untold, it asked the DHCP
/// server's port 4011, where nothing answers).
#[test]
fn a_proxydhcp_offer_after_the_ack_reaches_the_observer() {
    if !e2e_ready("a_proxydhcp_offer_after_the_ack_reaches_the_observer", &[]) {
        return;
    }
    let w = World::new("addr-late-proxy");
    let stop = Arc::new(AtomicBool::new(false));
    let server = late_proxy_server(&w.server_ns(), stop.clone());
    let (delivered_proxy, observed) = in_client(&w, async {
        let pool = AddrPool::start(lab_pool(CLIENT_IF)).unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let observer: fleetboot_addr::DhcpObserver = Arc::new(move |c: &fleetboot_addr::DhcpClient, _| {
            if let Some(p) = c.binding().and_then(|b| b.proxy.clone()) {
                tx.send_if_modified(|seen| seen.replace(p.server).is_none());
            }
        });
        let mac = fleetboot_boot::MacAddr([0x52, 0x54, 0x00, 0x78, 0x00, 0x43]);
        let mut client = fleetboot_addr::ClientConfig::pxe(mac, [0x43; 16]);
        client.initial_timeout = Duration::from_millis(500);
        let addr = pool.lease_observed(client, observer).await.expect("leased");
        let fleetboot_addr::Origin::Dhcp { binding, .. } = addr.origin() else { panic!("{:?}", addr.origin()) };
        let delivered = binding.proxy.as_ref().map(|p| p.server);
        // A guard against a hang only: the offer is on the wire right behind the ACK.
        let observed = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(Option::is_some)).await.ok().and_then(|r| *r.ok()?);
        drop(addr);
        pool.idle().await;
        (delivered, observed)
    });
    stop.store(true, Ordering::Relaxed);
    let proxied = server.join().unwrap();
    assert_eq!(proxied, 1, "one ProxyDHCP offer, after the ACK");
    assert_eq!(delivered_proxy, None, "the ACK came first: the binding delivered has no ProxyDHCP offer");
    assert_eq!(observed, Some(LATE_PROXY), "the observer was told of the ProxyDHCP offer heard after the ACK");
}

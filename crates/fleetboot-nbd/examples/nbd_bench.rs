//! nbdcopy (or QEMU's NBD client, `qemu-img convert` into its null driver) reading an image
//! from fleetboot vs nbdkit's file plugin vs qemu-nbd, on loopback, same run, interleaved
//! rounds; fleetboot through a private overlay holding every other block, and fleetboot
//! copying every READ piece through a buffer instead of `sendfile` (the A/B of zero copy).
//!
//! ```text
//! cargo run --release -p fleetboot-nbd --example nbd_bench -- [SIZE_MIB] [ROUNDS] [nbdcopy|qemu-img] [WORKDIR]
//!     [--clients N] [--connections C] [--client-nice K] [--only RUN,RUN...] [--hold S]
//! ```
//! Defaults: 1024 MiB, 5 rounds, nbdcopy, a temporary directory under /var/tmp, one client.
//! Needs nbdcopy, qemu-img, nbdkit and qemu-nbd. Prints one line per run and a summary
//! (median seconds, MB/s, ratio to fleetboot), and the CPU time each server process spent
//! per run (user + system, from /proc): on a busy machine wall time says more about the
//! neighbours than about the server, CPU time much less.
//!
//! `--clients N` starts N clients at once against each server, each reading the whole
//! export; the time is until the last one is done and the throughput is N × size over it
//! (a fleet booting together). On fleetboot, the "client overlay" run gives every client
//! its own copy-on-write overlay of the image, as N machines would have; the 50 % overlay
//! is one, read by all of them. `--connections C` is nbdcopy's `-C` (connections per
//! client, used when the server advertises multi-conn; nbdcopy's default is up to 4).
//! `--client-nice K` starts the clients K nice levels below the servers: on one machine
//! the clients' threads otherwise take CPU from the server as they would not from a server
//! on a host of its own (each server is treated the same). `--only` keeps some of the runs:
//! `plain` (fleetboot's read-only export), `own` (client overlays, nothing written), `half`
//! (the 50 % overlay), `nbdkit`, `qemu-nbd`, `copying` — e.g. `--only plain,half` to
//! alternate those two for a profile or an A/B. `--hold S` prints every run's URI after
//! the warm-up and keeps the servers up S seconds before the rounds, for other clients,
//! `perf` or `strace` to use.
//!
//! fleetboot's CPU time is this process's (`getrusage(RUSAGE_SELF)`, microseconds: it
//! includes starting the clients, the same for every fleetboot run); nbdkit's and
//! qemu-nbd's come from `/proc/PID/stat` in clock ticks (10 ms).

use fleetboot_images::{Catalog, ImportOptions};
use fleetboot_nbd::{Exports, ExportsConfig, OverlayMode};
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port}");
}

/// CPU seconds (user + system) process `pid` has used so far ("self": this one, to the
/// microsecond).
fn cpu_seconds(pid: &str) -> f64 {
    if pid == "self" {
        // SAFETY: getrusage writes into the struct we pass and has no other preconditions.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        return tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) : utime is the 12th, stime 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Which NBD client reads the image.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    Nbdcopy,
    /// `qemu-img convert` into QEMU's null driver: QEMU's own NBD client.
    QemuImg,
}

fn client_command(client: Client, uri: &str, size: u64, connections: Option<u32>, nice: i32) -> Command {
    let mut c = client_command_line(client, uri, size, connections);
    if nice != 0 {
        use std::os::unix::process::CommandExt;
        // SAFETY: nice(2) is async-signal-safe and touches only the child being started.
        unsafe {
            c.pre_exec(move || {
                libc::nice(nice);
                Ok(())
            });
        }
    }
    c
}

fn client_command_line(client: Client, uri: &str, size: u64, connections: Option<u32>) -> Command {
    match client {
        Client::Nbdcopy => {
            let mut c = Command::new("nbdcopy");
            if let Some(n) = connections {
                c.arg(format!("--connections={n}"));
            }
            c.args([uri, "null:"]);
            c
        }
        Client::QemuImg => {
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-n", "-f", "raw", "--target-image-opts", uri])
                .arg(format!("driver=null-co,size={size}"));
            c
        }
    }
}

/// Starts one client per URI at once; the time until the last one is done.
fn read_all(client: Client, uris: &[String], size: u64, connections: Option<u32>, nice: i32) -> Duration {
    let t = Instant::now();
    let children: Vec<(Child, &String)> = uris
        .iter()
        .map(|uri| (client_command(client, uri, size, connections, nice).spawn().expect("client"), uri))
        .collect();
    for (mut child, uri) in children {
        let st = child.wait().expect("client");
        assert!(st.success(), "reading {uri} failed");
    }
    t.elapsed()
}

/// CPU seconds (user + system) of this process's children waited for so far: the clients.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and has no other preconditions.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Seconds the threads of process `pid` have spent runnable but waiting for a CPU
/// (`/proc/PID/task/*/schedstat`, second field): on a shared machine, how much of a run the
/// server lost to everything else, rather than waited for its clients.
fn run_queue_seconds(pid: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// (idle, all) jiffies of the whole machine so far, from /proc/stat: whether a run left
/// cores unused (its clients and server waiting on each other) or used them all.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait ...: idle and iowait are the unused time.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().sum())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn make_image(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..size >> 20 {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let mut flag = |name: &str| -> Option<u32> {
        let i = args.iter().position(|a| a == name)?;
        let v = args.get(i + 1).unwrap_or_else(|| panic!("{name} needs a number")).parse().unwrap();
        args.drain(i..i + 2);
        Some(v)
    };
    let clients = flag("--clients").unwrap_or(1) as usize;
    let connections = flag("--connections");
    let client_nice = flag("--client-nice").unwrap_or(0) as i32;
    let hold = flag("--hold").map(|s| Duration::from_secs(s.into()));
    let only: Option<Vec<String>> = args.iter().position(|a| a == "--only").map(|i| {
        let v = args.get(i + 1).expect("--only needs a list").split(',').map(str::to_string).collect();
        args.drain(i..i + 2);
        v
    });
    assert!(clients >= 1, "--clients: at least 1");
    let mib: u64 = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(1024);
    let rounds: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(5);
    let client = match args.get(3).map(String::as_str) {
        None | Some("nbdcopy") => Client::Nbdcopy,
        Some("qemu-img") => Client::QemuImg,
        Some(c) => panic!("client {c:?}: nbdcopy or qemu-img"),
    };
    let tmp;
    let work = match args.get(4) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("fleetboot-bench")
                .tempdir_in("/var/tmp")
                .unwrap();
            tmp.path().to_path_buf()
        }
    };
    let size = mib << 20;
    let src = work.join("src.raw");
    eprintln!("making a {mib} MiB image in {}", work.display());
    make_image(&src, size);
    let catalog = Catalog::open_dir(&work).unwrap();
    let v = catalog
        .import(
            &src,
            &ImportOptions {
                name: Some("img".into()),
                format: Some("raw".into()),
            },
            &mut |_| {},
        )
        .unwrap();
    std::fs::remove_file(&src).unwrap();
    let image = catalog.blob_path(&v.sha256);

    let mut cfg = ExportsConfig::new(&work);
    cfg.default_mode = OverlayMode::Private;
    let exports = Exports::new(catalog, cfg).unwrap();
    // Half of the blocks in a private overlay: every other 64 KiB block rewritten.
    {
        let (export, _) = exports.open(&fleetboot_nbd::ExportName::parse("img@00-00-00-00-00-01").unwrap(), std::net::Ipv4Addr::LOCALHOST.into()).unwrap();
        let block = vec![0x5au8; 64 << 10];
        let mut off = 0;
        while off < size {
            export.disk.write(off, &block).unwrap();
            off += 2 * block.len() as u64;
        }
        export.disk.flush().unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let fb_port = listener.local_addr().unwrap().port();
    // Every client of the bench comes from 127.0.0.1; machines of a fleet would each have
    // their own address, so the per-address cap is lifted to let all of them in.
    let mut options = fleetboot_nbd::ServerOptions::new(fleetboot_nbd::Access::open_to_all());
    options.limits.max_connections_per_client = options.limits.max_connections;
    let mut copying = options.clone();
    rt.spawn(fleetboot_nbd::serve(listener, exports.clone(), options));
    // The same server copying every READ piece through a buffer (as before sendfile).
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let copy_port = listener.local_addr().unwrap().port();
    copying.send_from_files = false;
    rt.spawn(fleetboot_nbd::serve(listener, exports.clone(), copying));

    let kit_port = free_port();
    let _kit = Proc(
        Command::new("nbdkit")
            .args([
                "-f",
                "-r",
                "-i",
                "127.0.0.1",
                "-p",
                &kit_port.to_string(),
                "file",
            ])
            .arg(format!("file={}", image.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    let qn_port = free_port();
    let _qn = Proc(
        Command::new("qemu-nbd")
            .args([
                "-r",
                "-f",
                "raw",
                "-t",
                &format!("--shared={}", (clients * 4).max(16)),
                "-b",
                "127.0.0.1",
                "-p",
                &qn_port.to_string(),
                "-x",
                "img",
            ])
            .arg(&image)
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    wait_port(kit_port);
    wait_port(qn_port);
    let (kit_pid, qn_pid) = (_kit.0.id().to_string(), _qn.0.id().to_string());

    let own_overlays = if clients > 1 {
        "fleetboot (own client overlay each, 0% mapped)"
    } else {
        "fleetboot (client overlay, 0% mapped)"
    };
    let shared_overlay = if clients > 1 {
        "fleetboot (one client overlay, 50% mapped)"
    } else {
        "fleetboot (client overlay, 50% mapped)"
    };
    // Each run: its name and the URI client `i` reads.
    type Uri = Box<dyn Fn(usize) -> String>;
    // Each run: its key for --only, its name, the URI client `i` reads, the process serving
    // it (fleetboot is this one).
    let mut runs: Vec<(&str, &str, Uri, String)> = vec![
        ("plain", "fleetboot (read-only export)", Box::new(move |_| format!("nbd://127.0.0.1:{fb_port}/img")), "self".into()),
        (
            "own",
            own_overlays,
            // Client 0 keeps the MAC of the one-client bench: 00-00-00-00-00-02.
            Box::new(move |i| format!("nbd://127.0.0.1:{fb_port}/img@00-00-00-00-{:02x}-02", i)),
            "self".into(),
        ),
        ("half", shared_overlay, Box::new(move |_| format!("nbd://127.0.0.1:{fb_port}/img@00-00-00-00-00-01")), "self".into()),
        ("nbdkit", "nbdkit file", Box::new(move |_| format!("nbd://127.0.0.1:{kit_port}/")), kit_pid.clone()),
        ("qemu-nbd", "qemu-nbd", Box::new(move |_| format!("nbd://127.0.0.1:{qn_port}/img")), qn_pid.clone()),
        ("copying", "fleetboot (read-only, copying)", Box::new(move |_| format!("nbd://127.0.0.1:{copy_port}/img")), "self".into()),
    ];
    if let Some(only) = &only {
        for k in only {
            assert!(runs.iter().any(|r| r.0 == k), "--only: no run {k:?} (plain, own, half, nbdkit, qemu-nbd, copying)");
        }
        runs.retain(|r| only.iter().any(|k| k == r.0));
    }
    let uris: Vec<Vec<String>> = runs.iter().map(|(_, _, uri, _)| (0..clients).map(uri).collect()).collect();
    eprintln!("load average before: {}", load_average());
    // Warm the page cache (image and overlay) once through every server, one client each.
    for u in &uris {
        read_all(client, &u[..1], size, connections, client_nice);
    }
    if let Some(hold) = hold {
        for ((key, name, _, _), u) in runs.iter().zip(&uris) {
            println!("{key:10} {name:48} {}", u[0]);
        }
        std::io::stdout().flush().unwrap();
        std::thread::sleep(hold);
    }
    let total = size as f64 * clients as f64;
    let gib = total / (1u64 << 30) as f64;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut client_cpu: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    for r in 0..rounds {
        for (i, (_, name, _, pid)) in runs.iter().enumerate() {
            let c0 = cpu_seconds(pid);
            let k0 = children_cpu_seconds();
            let j0 = machine_jiffies();
            let q0 = run_queue_seconds(pid);
            let d = read_all(client, &uris[i], size, connections, client_nice).as_secs_f64();
            let c = cpu_seconds(pid) - c0;
            let k = children_cpu_seconds() - k0;
            let j1 = machine_jiffies();
            // nbdkit's threads end with their connections, and their schedstat with them.
            let q = match name.starts_with("nbdkit") {
                true => "n/a".to_string(),
                false => format!("{:.2} s", run_queue_seconds(pid) - q0),
            };
            let idle = (j1.0 - j0.0) as f64 / (j1.1 - j0.1).max(1) as f64;
            eprintln!(
                "round {r}: {name:48} {d:.3} s  {:.0} MB/s  server CPU {c:.2} s ({:.3} s/GiB), waited for a CPU {q}  clients' CPU {k:.2} s  machine idle {:.0}%  load {}",
                total / d / 1e6,
                c / gib,
                idle * 100.0,
                load_average()
            );
            times[i].push(d);
            cpu[i].push(c);
            client_cpu[i].push(k);
        }
    }
    let client_cpu_med: Vec<f64> = client_cpu
        .iter_mut()
        .map(|t| {
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            t[t.len() / 2]
        })
        .collect();
    let cpu_med: Vec<f64> = cpu
        .iter_mut()
        .map(|t| {
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            t[t.len() / 2]
        })
        .collect();
    let med: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            t[t.len() / 2]
        })
        .collect();
    let reader = if client == Client::Nbdcopy { "nbdcopy" } else { "qemu-img convert" };
    if clients > 1 || connections.is_some() || client_nice != 0 {
        println!(
            "{clients} × {reader} {mib} MiB to null: at once, connections per client {}, clients {client_nice} nice levels below the servers, loopback, {rounds} rounds, median (load average now {}):",
            connections.map_or("default".to_string(), |c| c.to_string()),
            load_average()
        );
    } else {
        println!("{reader} {mib} MiB to null:, loopback, {rounds} rounds, median:");
    }
    for (i, (_, name, _, _)) in runs.iter().enumerate() {
        println!(
            "  {name:48} {:.3} s  {:6.0} MB/s  peer/fleetboot time ratio {:.2}  server CPU {:.2} s ({:.3} s/GiB)  clients' CPU {:.3} s/GiB",
            med[i],
            total / med[i] / 1e6,
            med[i] / med[0],
            cpu_med[i],
            cpu_med[i] / gib,
            client_cpu_med[i] / gib
        );
    }
    // Throughput ratios between runs, where both were run: time of `b` over time of `a`.
    let at = |key: &str| runs.iter().position(|r| r.0 == key).map(|i| med[i]);
    let ratio = |label: &str, a: &str, b: &str| {
        if let (Some(ta), Some(tb)) = (at(a), at(b)) {
            println!("  {label:35} = {:.2}", tb / ta);
        }
    };
    ratio("throughput ratio fleetboot/nbdkit", "plain", "nbdkit");
    ratio("throughput ratio fleetboot/qemu-nbd", "plain", "qemu-nbd");
    ratio("overlay 50% mapped vs none", "half", "own");
    ratio("overlay 50% mapped vs plain export", "half", "plain");
    ratio("sendfile vs copying", "plain", "copying");
}

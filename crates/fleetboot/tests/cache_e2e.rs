//! Edge boot caches end to end, in network namespaces: an origin (`fleetboot serve` with
//! `[origin]`) behind a WAN shaped with `tc tbf` and losing 1% of its frames each way
//! (nftables on the WAN bridge), a branch gateway running `fleetboot cache` and the
//! branch's DHCP, and `fleetboot emulate` clients (or a QEMU VM) on the branch LAN. The
//! topology is `tests/cache_common`.
//!
//! What is checked is counted: bytes the origin sent (its own per-cache counters, and its
//! WAN interface), chunks the cache found corrupt against what was corrupted, the states
//! in both verification tables, the SHA-256 every client computed of what it received
//! (`emulate --expect`), the reasons in the cache's traces. Timeouts only stop a hang.
//!
//! Gating: root, the lab tools and payload (scripts/setup.sh); otherwise each test says
//! why and passes, unless `FLEETBOOT_REQUIRE_E2E=1` makes that a failure.

mod cache_common;

use cache_common::{random_bytes, ready, sha256_hex, Mode, Wan, GATEWAY_LAN, ORIGIN};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const CLIENTS: usize = 50;
const BOOT_URL: &str = "http://10.77.0.1:8080/boot/start.ipxe";
const MACS_A: &str = "02:fb:ee:00:00:00";
const MACS_B: &str = "02:fb:dd:00:00:00";

fn explicit(name: &str, chunk: &str, origin_extra: &str) -> Wan {
    let mut wan = Wan::new(name, "20mbit", 1);
    wan.start_origin(Mode::Explicit, false, chunk, origin_extra);
    wan.start_cache(Mode::Explicit, &format!("http://{ORIGIN}:8090"), "");
    wan.start_branch_dhcp(Some(BOOT_URL));
    wan
}

fn total(b: (u64, u64, u64)) -> u64 {
    b.0 + b.1 + b.2
}

#[test]
fn a_cold_storm_fills_once_and_a_warm_storm_costs_only_verification() {
    if !ready("cache cold/warm storm", &[]) {
        return;
    }
    let wan = explicit("storm", "256K", "");
    let unique = wan.unique_bytes();
    let tx0 = wan.origin_wan_tx();
    let (report, ok) = wan.emulate(CLIENTS, MACS_A, true);
    wan.assert_all_booted(&report, ok, CLIENTS);
    let cold = wan.origin_bytes();
    let tx_cold = wan.origin_wan_tx() - tx0;
    eprintln!(
        "cold: {CLIENTS} clients, boot p50 {} ms p99 {} ms; origin sent {} object + {} manifest + {} control bytes for {unique} unique bytes; WAN interface {tx_cold} bytes",
        report["boot"]["p50"], report["boot"]["p99"], cold.0, cold.1, cold.2
    );
    // Each object crossed once, whatever the number of clients.
    assert_eq!(cold.0, unique, "object bytes from the origin");
    assert!(total(cold) as f64 <= 1.05 * unique as f64, "origin bytes {} > 1.05 x {unique}", total(cold));
    // On the wire, with TCP/IP headers and retransmissions of the lossy WAN.
    assert!(tx_cold as f64 <= 1.10 * unique as f64, "WAN interface bytes {tx_cold} > 1.10 x {unique}");
    let s = wan.cache_status();
    assert_eq!(s["bytes_served"].as_u64().unwrap(), CLIENTS as u64 * unique);
    wan.eventually("both objects verified at the origin", |w| {
        w.origin_state("files/vmlinuz", 1).as_deref() == Some("verified") && w.origin_state("files/initrd.gz", 1).as_deref() == Some("verified")
    });

    let tx1 = wan.origin_wan_tx();
    let (report, ok) = wan.emulate(CLIENTS, MACS_A, true);
    wan.assert_all_booted(&report, ok, CLIENTS);
    let warm = wan.origin_bytes();
    let tx_warm = wan.origin_wan_tx() - tx1;
    let verification = total(warm) - total(cold);
    eprintln!(
        "warm: {CLIENTS} clients, boot p50 {} ms p99 {} ms; origin sent {} object bytes, {verification} bytes of plans and directives; WAN interface {tx_warm} bytes",
        report["boot"]["p50"], report["boot"]["p99"], warm.0 - cold.0
    );
    assert_eq!(warm.0, cold.0, "a warm cache fetches no object bytes");
    assert!(verification < unique / 50, "verification cost {verification} bytes");
    let s = wan.cache_status();
    assert_eq!(s["misses"].as_u64().unwrap() + s["hits"].as_u64().unwrap(), 4 * CLIENTS as u64);
    assert!(s["hits"].as_u64().unwrap() >= 2 * CLIENTS as u64, "{s:#}");
}

#[test]
fn curl_and_atftp_clients_get_the_signed_bytes_from_one_fill() {
    if !ready("cache curl + atftp clients", &["atftp", "sha256sum"]) {
        return;
    }
    const EACH: usize = 10;
    let wan = explicit("clients", "256K", "");
    let got = wan.path("got");
    std::fs::create_dir_all(&got).unwrap();
    // Cold: ten HTTP and ten TFTP clients at once, all for the kernel.
    let out = wan.sh(
        &wan.client.ns.clone(),
        &format!(
            "cd {dir} && for i in $(seq 1 {EACH}); do curl -sf --max-time 50 -o http-$i http://{GATEWAY_LAN}:8080/files/vmlinuz & \
             atftp --option 'blksize 1428' --option 'windowsize 8' -g -r vmlinuz -l tftp-$i {GATEWAY_LAN} >/dev/null 2>&1 & done; wait; sha256sum http-* tftp-*",
            dir = got.display()
        ),
    );
    let want = sha256_hex(&wan.kernel);
    let sums: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once("  ")).collect();
    assert_eq!(sums.len(), 2 * EACH, "{out}");
    for (sum, file) in &sums {
        assert_eq!(*sum, want, "{file} differs from the origin's kernel");
    }
    let kernel = wan.kernel.len() as u64;
    assert_eq!(wan.origin_bytes().0, kernel, "one fill for {} clients", 2 * EACH);
    // Served bytes count what went out, TFTP blocks sent again included.
    let served = wan.cache_status()["bytes_served"].as_u64().unwrap();
    assert!(served >= 2 * EACH as u64 * kernel, "served {served}");
    eprintln!("{EACH} curl + {EACH} atftp clients: {} kernel bytes from the origin; {served} bytes served ({} of them TFTP blocks sent again)", wan.origin_bytes().0, served - 2 * EACH as u64 * kernel);
}

#[test]
fn a_vm_boots_through_the_cache_to_the_marker() {
    if !ready("cache VM boot", &["qemu-system-x86_64"]) {
        return;
    }
    let mut wan = explicit("vm", "256K", "");
    let tap = wan.lab.add_tap().unwrap();
    let spec = fleetboot_lab::vm::VmSpec::new(0, &tap, &wan.nonce, &wan.dir.0);
    let run = fleetboot_lab::vm::boot(&wan.lab, &spec).expect("booting the VM");
    assert!(run.outcome.is_ok(), "{}: {}; console {}", spec.mac, run.outcome, spec.log_path.display());
    eprintln!("VM {} through the cache: {}", spec.mac, run.outcome);
    let kinds: Vec<String> = wan.cache_trace(&spec.mac).as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap().to_string()).collect();
    assert!(kinds.contains(&"CACHE-SCRIPT".to_string()), "{kinds:?}");
    assert!(kinds.iter().filter(|k| *k == "CACHE-MISS" || *k == "CACHE-HIT").count() >= 2, "{kinds:?}");
    assert_eq!(wan.origin_bytes().0, wan.unique_bytes());
}

/// A relay between the cache and the origin, in the origin's namespace, that flips one
/// byte in chunk after chunk of object bodies (at offset 777 of each chunk) until it has
/// flipped `budget` bytes. Returns the count of bytes it flipped.
fn corrupting_relay(ns: &str, listen: SocketAddr, upstream: SocketAddr, chunk: u64, budget: usize) -> Arc<AtomicUsize> {
    let flipped = Arc::new(AtomicUsize::new(0));
    let (f, ns) = (flipped.clone(), ns.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a valid namespace fd affects only this thread (and the threads
        // it spawns, which inherit it).
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let l = TcpListener::bind(listen).unwrap();
        tx.send(()).unwrap();
        let left = Arc::new(AtomicUsize::new(budget));
        for conn in l.incoming().flatten() {
            let (f, left) = (f.clone(), left.clone());
            std::thread::spawn(move || {
                let _ = relay_one(conn, upstream, chunk, &left, &f);
            });
        }
    });
    rx.recv().unwrap();
    flipped
}

fn read_head(s: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut all = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        all.extend_from_slice(&b[..n]);
        if let Some(p) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = all.split_off(p + 4);
            return Ok((all, rest));
        }
    }
}

fn relay_one(mut client: TcpStream, upstream: SocketAddr, chunk: u64, left: &AtomicUsize, flipped: &AtomicUsize) -> std::io::Result<()> {
    let mut up = TcpStream::connect(upstream)?;
    let (head, rest) = read_head(&mut client)?;
    let text = String::from_utf8_lossy(&head).to_string();
    let blob = text.starts_with("GET /cache/v1/blob/");
    up.write_all(&head)?;
    up.write_all(&rest)?;
    let body_len: usize = text.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
    let mut more = body_len.saturating_sub(rest.len());
    let mut b = vec![0u8; 65536];
    while more > 0 {
        let n = client.read(&mut b[..more.min(65536)])?;
        if n == 0 {
            break;
        }
        up.write_all(&b[..n])?;
        more -= n;
    }
    let (rhead, mut pending) = read_head(&mut up)?;
    let rtext = String::from_utf8_lossy(&rhead).to_ascii_lowercase();
    let mut at: u64 = rtext
        .lines()
        .find_map(|l| l.strip_prefix("content-range: bytes ").and_then(|r| r.split('-').next()).and_then(|s| s.trim().parse().ok()))
        .unwrap_or(0);
    client.write_all(&rhead)?;
    loop {
        if pending.is_empty() {
            let n = up.read(&mut b)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&b[..n]);
        }
        if blob {
            let end = at + pending.len() as u64;
            let mut k = at / chunk;
            while k * chunk + 777 < end {
                let p = k * chunk + 777;
                if p >= at && left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1)).is_ok() {
                    pending[(p - at) as usize] ^= 0xff;
                    flipped.fetch_add(1, Ordering::SeqCst);
                }
                k += 1;
            }
        }
        client.write_all(&pending)?;
        at += pending.len() as u64;
        pending.clear();
    }
}

#[test]
fn a_hundred_corruptions_on_the_wire_and_on_disk_are_all_caught() {
    if !ready("cache corruption", &[]) {
        return;
    }
    const CHUNK: u64 = 64 << 10;
    let mut wan = Wan::new("corrupt", "20mbit", 1);
    wan.start_origin(Mode::Explicit, false, "64K", "");
    let relay: SocketAddr = format!("{ORIGIN}:8099").parse().unwrap();
    let flipped = corrupting_relay(&wan.origin_ns, relay, "127.0.0.1:8090".parse().unwrap(), CHUNK, 50);
    wan.start_cache(Mode::Explicit, &format!("http://{relay}"), "");
    wan.start_branch_dhcp(Some(BOOT_URL));
    // 50 bytes flipped on the wire from the origin.
    let (report, ok) = wan.emulate(CLIENTS, MACS_A, true);
    wan.assert_all_booted(&report, ok, CLIENTS);
    let s = wan.cache_status();
    assert_eq!(flipped.load(Ordering::SeqCst), 50, "the relay flipped its budget");
    assert_eq!(s["corrupt_chunks_wire"], 50, "every chunk corrupted on the wire was caught: {s:#}");
    // 50 chunks damaged on the cache's disk while it is down (nothing of them in memory).
    wan.stop_cache();
    let objects = wan.path("cache-data/cache/objects");
    let kernel_file = std::fs::read_dir(&objects)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&kernel_file).unwrap();
        for k in 0..50u64 {
            let at = (k * 4 + 1) * CHUNK + 4321;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x81], at).unwrap();
        }
    }
    wan.start_cache(Mode::Explicit, &format!("http://{relay}"), "");
    let (report, ok) = wan.emulate(CLIENTS, MACS_A, true);
    wan.assert_all_booted(&report, ok, CLIENTS);
    let s = wan.cache_status();
    assert_eq!(s["corrupt_chunks_disk"], 50, "every chunk damaged on disk was caught: {s:#}");
    eprintln!(
        "100 corruptions (50 on the wire, 50 on disk): {} + {} caught; {} clients received only verified bytes",
        flipped.load(Ordering::SeqCst),
        s["corrupt_chunks_disk"],
        2 * CLIENTS
    );
}

#[test]
fn an_updated_kernel_moves_only_changed_chunks_and_clients_switch_once_their_cache_verified_it() {
    if !ready("cache update push", &[]) {
        return;
    }
    const CHUNK: usize = 256 << 10;
    let mut wan = explicit("update", "256K", "");
    let (report, ok) = wan.emulate(5, MACS_A, true);
    wan.assert_all_booted(&report, ok, 5);
    wan.eventually("v1 verified at the origin", |w| w.origin_state("files/vmlinuz", 1).as_deref() == Some("verified"));
    let before = wan.origin_bytes().0;
    let old_sha = sha256_hex(&wan.kernel);
    // Three chunks change. The WAN is throttled so that fetching them takes a minute: the
    // clients booting meanwhile must get the old kernel, the one their cache holds.
    let mut v2 = wan.kernel.clone();
    for k in [3usize, 17, 40] {
        v2[k * CHUNK + 99] ^= 0x42;
    }
    wan.shape("100kbit");
    std::fs::write(wan.path("root/vmlinuz"), &v2).unwrap();
    wan.eventually("v2 pending at the cache", |w| {
        w.cache_status()["objects"].as_array().unwrap().iter().any(|o| o["name"] == "files/vmlinuz" && o["version"] == 2)
    });
    let (report, ok) = wan.emulate(5, MACS_A, true);
    wan.assert_all_booted(&report, ok, 5);
    let kernels = Wan::kernels(&report);
    assert!(kernels.iter().all(|s| *s == old_sha), "clients got the old kernel: {kernels:?}");
    let v2_row = wan.cache_status()["objects"].as_array().unwrap().iter().find(|o| o["name"] == "files/vmlinuz" && o["version"] == 2).cloned().unwrap();
    assert_eq!(v2_row["state"], "pending", "v2 was still being fetched while they booted: {v2_row:#}");
    assert_ne!(wan.origin_state("files/vmlinuz", 2).as_deref(), Some("verified"));
    // The WAN recovers; the push completes.
    wan.shape("20mbit");
    wan.eventually("v2 verified at the origin", |w| w.origin_state("files/vmlinuz", 2).as_deref() == Some("verified"));
    let moved = wan.origin_bytes().0 - before;
    assert_eq!(moved, 3 * CHUNK as u64, "only the three changed chunks crossed the WAN");
    let s = wan.cache_status();
    assert_eq!(s["bytes_adopted"].as_u64().unwrap(), (v2.len() - 3 * CHUNK) as u64);
    assert_eq!(wan.origin_state("files/vmlinuz", 1).as_deref(), Some("stale"));
    wan.kernel = v2;
    let (report, ok) = wan.emulate(5, MACS_A, true);
    wan.assert_all_booted(&report, ok, 5);
    eprintln!("update: {moved} bytes pushed for a {}-byte kernel with 3 changed chunks", wan.kernel.len());
}

#[test]
fn with_the_wan_cut_known_clients_keep_booting_and_the_others_are_told_why() {
    if !ready("cache WAN cut", &[]) {
        return;
    }
    let next = random_bytes(0x6e657874, 24 << 20);
    let mut wan = Wan::new("cut", "20mbit", 1);
    std::fs::write(wan.path("root/vmlinuz-next"), &next).unwrap();
    wan.start_origin(
        Mode::Explicit,
        false,
        "256K",
        "[[profile]]\nname = \"next\"\npriority = 10\nmatch = { mac = [\"02:fb:dd:00:00:00\"] }\n\
         boot = { kind = \"linux\", kernel = \"vmlinuz-next\", initrd = [\"initrd.gz\"], cmdline = \"x\" }\n",
    );
    wan.start_cache(Mode::Explicit, &format!("http://{ORIGIN}:8090"), "");
    wan.start_branch_dhcp(Some(BOOT_URL));
    let (report, ok) = wan.emulate(CLIENTS, MACS_A, true);
    wan.assert_all_booted(&report, ok, CLIENTS);
    // 02:fb:dd:00:00:00 gets its plan (vmlinuz-next) on a slow link; the WAN is cut before
    // its 24 MiB can arrive.
    wan.shape("1mbit");
    let script = wan.sh(&wan.client.ns.clone(), &format!("curl -sf --max-time 30 http://{GATEWAY_LAN}:8080/boot/02-fb-dd-00-00-00.ipxe"));
    assert!(script.contains("vmlinuz-next"), "{script}");
    wan.cut(true);
    let (report, ok) = wan.emulate(CLIENTS, MACS_A, true);
    wan.assert_all_booted(&report, ok, CLIENTS);
    let s = wan.cache_status();
    assert!(s["plans_from_map"].as_u64().unwrap() >= CLIENTS as u64, "{s:#}");
    assert!(s["origin_down"].is_string());
    // The client whose kernel is not here, and clients the cache never heard of.
    let (report, ok) = wan.emulate(1, MACS_B, false);
    assert!(!ok && report["failed"] == 1);
    let error = report["clients"][0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("files/vmlinuz-next version 1 is not held verified at this cache and the origin is unreachable"), "{error}");
    let (report, ok) = wan.emulate(3, "02:fb:cc:00:00:00", false);
    assert!(!ok && report["failed"] == 3);
    let error = report["clients"][0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("is not in this cache's image map and the origin is unreachable"), "{error}");
    for mac in ["02:fb:dd:00:00:00", "02:fb:cc:00:00:00"] {
        let trace = wan.cache_trace(mac);
        let refused = trace.as_array().unwrap().iter().find(|e| e["kind"] == "CACHE-REFUSED").unwrap_or_else(|| panic!("{mac}: {trace:#}"));
        assert!(refused["detail"].as_str().unwrap().contains("the origin is unreachable"), "{refused:#}");
    }
    // The WAN comes back: the unknown client boots.
    wan.cut(false);
    wan.shape("20mbit");
    wan.eventually("the origin is reachable again", |w| w.cache_status()["origin_down"].is_null());
    let (report, ok) = wan.emulate(3, "02:fb:cc:00:00:00", true);
    wan.assert_all_booted(&report, ok, 3);
}

#[test]
fn transparent_interception_answers_for_the_origin_and_passes_the_rest_through() {
    if !ready("cache transparent", &[]) {
        return;
    }
    let mut wan = Wan::new("transparent", "20mbit", 1);
    wan.start_origin(Mode::Transparent, true, "256K", "");
    wan.start_cache(Mode::Transparent, &format!("http://{ORIGIN}:8090"), "");
    wan.tproxy(8081);
    wan.start_branch_dhcp(None);
    let (report, ok) = wan.emulate(10, MACS_A, true);
    wan.assert_all_booted(&report, ok, 10);
    // The clients asked the origin's address for every file; the cache answered.
    for c in report["clients"].as_array().unwrap() {
        for f in c["files"].as_array().unwrap() {
            assert!(f["url"].as_str().unwrap().starts_with(&format!("http://{ORIGIN}:8080/")), "{f:#}");
        }
    }
    assert_eq!(wan.origin_bytes().0, wan.unique_bytes(), "one fill for ten clients");
    assert_eq!(wan.cache_status()["bytes_served"].as_u64().unwrap(), 10 * wan.unique_bytes());
    // Anything else on that port reaches the origin itself (the cache has no /trace).
    let passed = wan.sh(&wan.client.ns.clone(), &format!("curl -s --max-time 30 http://{ORIGIN}:8080/trace/not-a-mac"));
    let v: Value = serde_json::from_str(&passed).unwrap_or_else(|e| panic!("{e}: {passed}"));
    assert!(v["error"].as_str().unwrap_or_default().contains("is not a MAC address"), "{v:#}");
}

#[test]
fn an_image_is_read_over_nbd_through_the_cache_from_one_fill_and_only_verified() {
    if !ready("cache NBD reads", &["nbdcopy", "nbdinfo", "sha256sum"]) {
        return;
    }
    const CHUNK: u64 = 64 << 10;
    const SHARED: &str = "02:fb:aa:00:00:01";
    const OWN: &str = "02:fb:ab:00:00:01";
    let mut wan = Wan::new("nbd", "20mbit", 1);
    // The cache's clients read a shared disk at the cache; a client's own overlay stays
    // at the origin.
    let origin_extra = format!(
        "nbd = \"{GATEWAY_LAN}:10809\"\n[nbd]\nenabled = true\n\
         [[profile]]\nname = \"shared-disk\"\npriority = 10\nmatch = {{ mac = [\"{SHARED}\"] }}\n\
         boot = {{ kind = \"linux\", kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"console=ttyS0\", disk = {{ image = \"small\", overlay = \"shared\" }} }}\n\
         [[profile]]\nname = \"own-disk\"\npriority = 10\nmatch = {{ mac = [\"{OWN}\"] }}\n\
         boot = {{ kind = \"linux\", kernel = \"vmlinuz\", initrd = [\"initrd.gz\"], cmdline = \"console=ttyS0\", disk = {{ image = \"small\" }} }}\n"
    );
    wan.start_origin(Mode::Explicit, false, "64K", &origin_extra);
    // A small image (4 MiB, 64 chunks) in the origin's catalog.
    let image = random_bytes(0x4e4244, 4 << 20);
    std::fs::write(wan.path("small.raw"), &image).unwrap();
    let out = std::process::Command::new(cache_common::BIN)
        .args(["image", "import"])
        .arg(wan.path("small.raw"))
        .args(["--name", "small", "--format", "raw", "--config"])
        .arg(wan.path("origin.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "image import: {}", String::from_utf8_lossy(&out.stderr));
    let cache_extra = format!("nbd_listen = \"{GATEWAY_LAN}:10809\"\n");
    wan.start_cache(Mode::Explicit, &format!("http://{ORIGIN}:8090"), &cache_extra);
    let gw = wan.gw_ns.clone();
    wan.lab.wait_listening(&gw, fleetboot_lab::netns::Proto::Tcp, 10809, std::time::Duration::from_secs(30)).unwrap();
    let ns = wan.client.ns.clone();
    let got = wan.path("got");
    std::fs::create_dir_all(&got).unwrap();
    let url = format!("nbd://{GATEWAY_LAN}:10809/small");
    let want = sha256_hex(&image);
    let copies = |wan: &Wan, names: &[&str]| -> Vec<String> {
        let cmds: Vec<String> = names.iter().map(|n| format!("timeout 60 nbdcopy {url} {d}/{n} &", d = got.display())).collect();
        let files: Vec<String> = names.iter().map(|n| format!("{}/{n}", got.display())).collect();
        let out = wan.sh(&ns, &format!("{} wait; sha256sum {}", cmds.join(" "), files.join(" ")));
        out.lines().filter_map(|l| l.split_once("  ")).map(|(s, _)| s.to_string()).collect()
    };

    // Cold: two readers at once, one fill.
    assert_eq!(wan.sh(&ns, &format!("timeout 60 nbdinfo --size {url}")).trim(), image.len().to_string());
    let sums = copies(&wan, &["cold-1", "cold-2"]);
    assert_eq!(sums, vec![want.clone(), want.clone()], "both readers got the image");
    let cold = wan.origin_bytes().0;
    assert_eq!(cold, image.len() as u64, "the image crossed the WAN once for two readers");
    let s = wan.cache_status();
    assert!(s["bytes_served"].as_u64().unwrap() >= 2 * image.len() as u64, "{s:#}");

    // Warm: nothing more from the origin.
    let sums = copies(&wan, &["warm"]);
    assert_eq!(sums, vec![want.clone()]);
    assert_eq!(wan.origin_bytes().0, cold, "a warm read costs no object bytes");

    // A client's own overlay is not served here, and says where it is.
    let refused = wan.sh(&ns, &format!("timeout 30 nbdinfo {url}@02-fb-ab-00-00-01 >/dev/null 2>&1 && echo served || echo refused"));
    assert_eq!(refused.trim(), "refused");
    let log = std::fs::read_to_string(wan.path("cache.log")).unwrap();
    assert!(log.contains("a client's own overlay is served by the origin"), "the cache says why");

    // Chunks damaged on the cache's disk while it is down are fetched again, not served.
    wan.stop_cache();
    let objects = wan.path("cache-data/cache/objects");
    let data = std::fs::read_dir(&objects)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "data") && std::fs::metadata(p).unwrap().len() == image.len() as u64)
        .expect("the image's data file at the cache");
    const DAMAGED: u64 = 5;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&data).unwrap();
        for k in 0..DAMAGED {
            let at = (k * 7 + 3) * CHUNK + 999;
            let mut b = [0u8];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
        }
    }
    let before = wan.origin_bytes().0;
    wan.start_cache(Mode::Explicit, &format!("http://{ORIGIN}:8090"), &cache_extra);
    wan.lab.wait_listening(&gw, fleetboot_lab::netns::Proto::Tcp, 10809, std::time::Duration::from_secs(30)).unwrap();
    let sums = copies(&wan, &["after-damage"]);
    assert_eq!(sums, vec![want.clone()], "the reader got the image, not the damaged bytes");
    let s = wan.cache_status();
    assert_eq!(s["corrupt_chunks_disk"], DAMAGED, "every damaged chunk was caught: {s:#}");
    let refetched = wan.origin_bytes().0 - before;
    assert_eq!(refetched, DAMAGED * CHUNK, "only the damaged chunks came again");

    // Last, as a plan starts the fills of its kernel and initrd: the origin's plans name
    // the cache for the shared disk, the origin for the client's own overlay.
    let script = |mac: &str| wan.sh(&ns, &format!("curl -sf --max-time 30 http://{GATEWAY_LAN}:8080/boot/{mac}.ipxe", mac = mac.replace(':', "-")));
    let shared = script(SHARED);
    assert!(shared.contains(&format!("fleetboot.disk=nbd://{GATEWAY_LAN}:10809/small\n")), "{shared}");
    let own = script(OWN);
    assert!(own.contains(&format!("fleetboot.disk=nbd://{ORIGIN}:10809/small@02-fb-ab-00-00-01")), "{own}");

    eprintln!(
        "NBD through the cache: {} image bytes from the origin for two cold readers, 0 for a warm one; {DAMAGED} damaged chunks caught and {refetched} bytes fetched again",
        cold
    );
}

/// nginx as the plain HTTP caching proxy a site might run instead of a fleetboot cache:
/// `proxy_cache` with `proxy_cache_lock on` (one request to the origin per object, the
/// others wait for it), the lock's timeout and age raised from their 5 s defaults so that
/// waiting clients are not sent to the origin while a fill crosses a slow WAN. One
/// process (`master_process off`), so the lab stops it by its pid.
fn start_nginx(wan: &mut Wan, listen: &str) -> u32 {
    let w = wan.path("nginx");
    for d in ["cache", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"] {
        std::fs::create_dir_all(w.join(d)).unwrap();
    }
    let conf = format!(
        "daemon off;\nmaster_process off;\nuser root;\npid {w}/nginx.pid;\nerror_log {w}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {w}/tmp/body;\n  proxy_temp_path {w}/tmp/proxy;\n  \
         fastcgi_temp_path {w}/tmp/fastcgi;\n  uwsgi_temp_path {w}/tmp/uwsgi;\n  scgi_temp_path {w}/tmp/scgi;\n  \
         proxy_cache_path {w}/cache levels=1:2 keys_zone=boot:10m max_size=2g inactive=1h use_temp_path=off;\n  \
         server {{\n    listen {listen};\n    location /files/ {{\n      proxy_pass http://{ORIGIN}:8080;\n      \
         proxy_http_version 1.1;\n      proxy_cache boot;\n      proxy_cache_lock on;\n      proxy_cache_lock_timeout 600s;\n      \
         proxy_cache_lock_age 600s;\n      proxy_cache_valid 200 1h;\n      proxy_ignore_headers Cache-Control Expires Set-Cookie;\n    }}\n  }}\n}}\n",
        w = w.display()
    );
    std::fs::write(w.join("nginx.conf"), conf).unwrap();
    let log = std::fs::File::create(w.join("stderr.log")).unwrap();
    let mut cmd = wan.lab.cmd(&wan.gw_ns, "timeout");
    cmd.args(["900", "nginx", "-c"]).arg(w.join("nginx.conf")).args(["-p"]).arg(&w);
    cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
    let pid = wan.lab.spawn("nginx", cmd).unwrap();
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let gw = wan.gw_ns.clone();
    wan.lab.wait_listening(&gw, fleetboot_lab::netns::Proto::Tcp, port, std::time::Duration::from_secs(30)).unwrap();
    pid
}

/// The branch boot storm three ways in one topology and one run: clients straight to the
/// origin, through nginx `proxy_cache` + `proxy_cache_lock`, and through `fleetboot cache`
/// (transparent: the gateway diverts the origin's HTTP port to it), cold then warm for
/// the two caches. Every client hashes what it got. Prints a markdown table (boot times,
/// bytes on the origin's WAN interface). `scripts/bench-cache.sh` runs it;
/// `FLEETBOOT_BENCH_CLIENTS` (default 50) and `FLEETBOOT_BENCH_WAN` (default 100mbit).
#[test]
#[ignore = "benchmark: scripts/bench-cache.sh"]
fn bench_branch_storm_direct_nginx_and_cache() {
    if !ready("cache benchmark", &["nginx"]) {
        return;
    }
    let clients: usize = std::env::var("FLEETBOOT_BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(50).clamp(1, 70);
    let rate = std::env::var("FLEETBOOT_BENCH_WAN").unwrap_or_else(|_| "100mbit".into());
    const NGINX_MACS: &str = "02:fb:d2:00:00:00";
    const NGINX: &str = "10.77.0.1:8082";
    let mut wan = Wan::new("bench", &rate, 1);
    // Clients of the nginx leg boot a profile naming the proxy for their files (what a
    // site without a fleetboot cache would write); the others the lab profile.
    let nginx_profile = format!(
        "[[profile]]\nname = \"via-nginx\"\npriority = 10\nmatch = {{ mac = [\"02:fb:d2:*\"] }}\n\
         boot = {{ kind = \"linux\", kernel = \"http://{NGINX}/files/vmlinuz\", initrd = [\"http://{NGINX}/files/initrd.gz\"], cmdline = \"console=ttyS0 panic=-1\" }}\n"
    );
    wan.start_origin(Mode::Transparent, true, "256K", &nginx_profile);
    wan.start_branch_dhcp(None);
    let unique = wan.unique_bytes();
    let mut rows = Vec::new();
    let leg = |wan: &Wan, what: &str, macs: &str, rows: &mut Vec<String>| {
        let tx = wan.origin_wan_tx();
        let (report, ok) = wan.emulate(clients, macs, true);
        wan.assert_all_booted(&report, ok, clients);
        let sent = wan.origin_wan_tx() - tx;
        let secs = |v: &Value| v.as_f64().map_or_else(|| "?".to_string(), |ms| format!("{:.1} s", ms / 1000.0));
        let row = format!(
            "| {what} | {} | {} | {} | {sent} ({:.2} × unique) |",
            secs(&report["boot"]["p50"]),
            secs(&report["boot"]["p99"]),
            secs(&report["wall_ms"]),
            sent as f64 / unique as f64
        );
        eprintln!("{row}");
        rows.push(row);
    };
    leg(&wan, "straight to the origin", MACS_A, &mut rows);
    let nginx = start_nginx(&mut wan, NGINX);
    leg(&wan, "nginx proxy_cache + lock, cold", NGINX_MACS, &mut rows);
    leg(&wan, "nginx proxy_cache + lock, warm", NGINX_MACS, &mut rows);
    wan.lab.stop(nginx, std::time::Duration::from_secs(5));
    wan.start_cache(Mode::Transparent, &format!("http://{ORIGIN}:8090"), "");
    wan.tproxy(8081);
    leg(&wan, "fleetboot cache, cold", MACS_A, &mut rows);
    leg(&wan, "fleetboot cache, warm", MACS_A, &mut rows);
    let (objects, manifests, control) = wan.origin_bytes();
    println!(
        "\n{clients} clients, WAN {rate} with 1% loss each way, {unique} unique bytes (kernel + initrd)\n\n\
         | run | boot p50 | boot p99 | storm (last client done) | bytes on the origin's WAN interface |\n|---|---|---|---|---|\n{}\n\n\
         fleetboot cache: {objects} object + {manifests} manifest + {control} control bytes from the origin over both of its runs",
        rows.join("\n")
    );
}

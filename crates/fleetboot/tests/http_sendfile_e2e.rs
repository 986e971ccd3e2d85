//! End to end: the boot network's files and images leave `fleetboot serve` by sendfile(2).
//!
//! curl in a client namespace fetches files and a catalog image from the server's HTTP
//! listener: whole, by range (first bytes, middle, suffix, unsatisfiable), by HEAD, several
//! over one kept-alive connection, slowly, and breaking off midway. Every body is checked
//! by SHA-256 against the file, and `fleetboot_http_sendfile_bytes_total` must grow by
//! exactly the bytes of the bodies sent (none for HEAD or a 416): proof that they went
//! through sendfile and not through a copy. An HTTP/1.0 request (which hyper serves) gets
//! the same bytes without sendfile.
//!
//! Needs root and curl; skips otherwise unless `FLEETBOOT_REQUIRE_E2E=1`.

mod common;

use common::{e2e_ready, fleetboot_with_config as fleetboot, random_bytes, s, Env, HTTP};
use sha2::{Digest, Sha256};
use std::fs;

const SENT: &str = "fleetboot_http_sendfile_bytes_total";

/// The most a TCP socket's buffer may grow to in the client's and the server's namespaces.
const BUFFER_CAP: u64 = 1 << 20;

/// Caps the client's receive and the server's send buffers at [`BUFFER_CAP`]. On a machine
/// whose tcp_rmem lets autotuning grow a receive buffer to 32 MiB, a whole file of this
/// test fits in the buffers: a server would be done "sending" it before the client read a
/// byte, and what the tests claim about the server would be a claim about the kernel.
fn cap_socket_buffers(env: &mut Env, client_ns: &str) {
    let server_ns = env.server_ns();
    for (ns, knob) in [(client_ns, "tcp_rmem"), (server_ns.as_str(), "tcp_wmem")] {
        env.run_ok(ns, &["sh", "-c", &format!("echo '4096 16384 {BUFFER_CAP}' > /proc/sys/net/ipv4/{knob}")], 10);
    }
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

#[test]
fn files_and_images_go_out_by_sendfile_with_the_exact_bytes() {
    if !e2e_ready("http_sendfile_e2e", &["curl"]) {
        return;
    }
    let mut env = Env::new("http-sendfile");
    let kernel = random_bytes(1, 3 * 1024 * 1024 + 17);
    let initrd = random_bytes(2, 700 * 1024);
    let big = random_bytes(3, 24 * 1024 * 1024);
    env.put_file("boot/vmlinuz", &kernel);
    env.put_file("boot/initrd.gz", &initrd);
    env.put_file("big.img", &big);
    let disk = random_bytes(4, 2 * 1024 * 1024);
    let disk_path = env.dir.join("disk.raw");
    fs::write(&disk_path, &disk).unwrap();
    let out = fleetboot(&["image", "import", &s(&disk_path), "--name", "disk", "--format", "raw"], &env.config);
    assert!(out.contains("imported disk:1"), "{out}");
    env.start_server();
    let ns = env.add_client(Some("10.77.0.50/24"), None).ns;
    let mut expected_sent = 0u64;

    // Whole files and a whole image.
    for (url, want) in [("/files/boot/vmlinuz", &kernel), ("/files/boot/initrd.gz", &initrd), ("/images/disk", &disk)] {
        let (code, body) = env.http(&ns, &[], &format!("{HTTP}{url}"));
        assert_eq!(code, 200, "{url}");
        assert_eq!(sha(&body), sha(want), "{url}: bytes differ");
        expected_sent += want.len() as u64;
    }
    assert_eq!(env.metric(SENT) as u64, expected_sent, "whole bodies went by sendfile");

    // Ranges: the first bytes, a middle span of an image, a suffix; then one past the end.
    let cases: [(&str, &str, &[u8]); 3] = [
        ("/files/boot/vmlinuz", "0-99", &kernel[..100]),
        ("/images/disk", "4096-1052671", &disk[4096..1_052_672]),
        ("/files/boot/vmlinuz", "-500", &kernel[kernel.len() - 500..]),
    ];
    for (url, range, want) in cases {
        let (code, body) = env.http(&ns, &["-r", range], &format!("{HTTP}{url}"));
        assert_eq!(code, 206, "{url} {range}");
        assert_eq!(sha(&body), sha(want), "{url} {range}: bytes differ");
        expected_sent += want.len() as u64;
    }
    let past_end = format!("{}-", kernel.len() + 10);
    let (code, _) = env.http(&ns, &["-r", &past_end], &format!("{HTTP}/files/boot/vmlinuz"));
    assert_eq!(code, 416, "a range past the end is unsatisfiable");
    let headers = env.run_ok(&ns, &["curl", "-sS", "-D", "-", "-o", "/dev/null", "-r", &past_end, &format!("{HTTP}/files/boot/vmlinuz")], 60);
    assert!(headers.stdout_str().to_ascii_lowercase().contains(&format!("content-range: bytes */{}", kernel.len())), "{}", headers.stdout_str());
    assert_eq!(env.metric(SENT) as u64, expected_sent, "ranges went by sendfile, a 416 sent nothing");

    // HEAD: the length, no body.
    let head = env.run_ok(&ns, &["curl", "-sS", "-I", &format!("{HTTP}/files/boot/vmlinuz")], 60).stdout_str().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {}", kernel.len())), "{head}");
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    let head = env.run_ok(&ns, &["curl", "-sS", "-I", &format!("{HTTP}/images/disk")], 60).stdout_str().to_ascii_lowercase();
    assert!(head.contains(&format!("content-length: {}", disk.len())) && head.contains("etag:"), "{head}");
    assert_eq!(env.metric(SENT) as u64, expected_sent, "HEAD sends no body");

    // Keep-alive: a script-like miss, two files and a range over one connection, in order.
    let dir = env.dir.join("ka");
    fs::create_dir_all(&dir).unwrap();
    let names = ["a", "b", "c", "d"];
    // `--next`: options per transfer; curl keeps its connections across them.
    let mut args = vec!["curl".to_string()];
    for (n, url) in names.iter().zip(["/files/missing", "/files/boot/initrd.gz", "/files/boot/vmlinuz", "/images/disk"]) {
        if *n != "a" {
            args.push("--next".into());
        }
        args.extend(["-sS".into(), "-w".into(), "%{http_code} %{num_connects}\\n".into()]);
        if *n == "d" {
            args.extend(["-r".into(), "0-4095".into()]);
        }
        args.extend(["-o".into(), s(&dir.join(n)), format!("{HTTP}{url}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines = env.run_ok(&ns, &args, 60).stdout_str();
    let got: Vec<&str> = lines.lines().collect();
    assert_eq!(got, ["404 1", "200 0", "200 0", "206 0"], "one connection, reused for every request");
    assert_eq!(sha(&fs::read(dir.join("b")).unwrap()), sha(&initrd));
    assert_eq!(sha(&fs::read(dir.join("c")).unwrap()), sha(&kernel));
    assert_eq!(sha(&fs::read(dir.join("d")).unwrap()), sha(&disk[..4096]));
    expected_sent += (initrd.len() + kernel.len() + 4096) as u64;
    assert_eq!(env.metric(SENT) as u64, expected_sent);

    // A slow reader gets every byte.
    let slow = env.dir.join("slow");
    let r = env.run_ok(&ns, &["curl", "-sS", "--limit-rate", "4M", "-o", &s(&slow), &format!("{HTTP}/files/boot/vmlinuz")], 60);
    assert!(r.ok());
    assert_eq!(sha(&fs::read(&slow).unwrap()), sha(&kernel), "a slow reader's bytes differ");
    expected_sent += kernel.len() as u64;
    assert_eq!(env.metric(SENT) as u64, expected_sent);

    // A client that goes away midway: the server stops sending (no more left than curl
    // read and the two sockets' buffers held), keeps serving others, and gives its
    // connection back.
    cap_socket_buffers(&mut env, &ns);
    let cut = env.run(&ns, &["curl", "-sS", "--limit-rate", "1M", "--max-time", "2", "-w", "%{size_download}", "-o", "/dev/null", &format!("{HTTP}/files/big.img")], 30);
    assert!(!cut.ok(), "curl was meant to give up midway");
    let read: u64 = cut.stdout_str().trim().parse().unwrap_or_else(|_| panic!("curl's size_download: {:?}", cut.stdout_str()));
    let (code, body) = env.http(&ns, &[], &format!("{HTTP}/files/boot/initrd.gz"));
    assert_eq!((code, sha(&body)), (200, sha(&initrd)), "served after a client broke off");
    expected_sent += initrd.len() as u64;
    let broke_off = env.metric(SENT) as u64 - expected_sent;
    // The two buffers hold at most their caps (2 MiB seen under load); as much again is
    // left for the kernel's slack. Either way far below the file.
    let most = read + 4 * BUFFER_CAP;
    assert!(
        broke_off >= read && broke_off <= most && broke_off < big.len() as u64,
        "the abandoned body was cut short: {broke_off} of {} bytes went out, curl read {read}, at most {most} expected",
        big.len()
    );
    assert!(
        env.eventually(50, |e| e.metric("fleetboot_connections{listener=\"http\"}") == 0.0),
        "every connection given back"
    );
    expected_sent += broke_off;

    // HTTP/1.0 is left to hyper: the same bytes, through user space.
    let (code, body) = env.http(&ns, &["-0"], &format!("{HTTP}/files/boot/initrd.gz"));
    assert_eq!((code, sha(&body)), (200, sha(&initrd)), "HTTP/1.0");
    // A request head beyond the limit is refused, the listener keeps serving.
    let huge = format!("X-Big: {}", "a".repeat(20 * 1024));
    let (code, _) = env.http(&ns, &["-H", &huge], &format!("{HTTP}/files/boot/initrd.gz"));
    assert_eq!(code, 431, "an oversized request head");
    assert_eq!(env.metric(SENT) as u64, expected_sent, "neither went by sendfile");
}

/// A storm of large files through `http.concurrent_transfers = 2`: eight curls at once
/// (each reading at 16 MB/s through capped buffers, so that each holds its place for
/// about 0.4 s and they overlap) all get their exact bytes, most of them after waiting
/// for a place, and every place is given back at the end.
#[test]
fn a_storm_of_large_files_goes_a_few_at_a_time_and_all_arrive() {
    if !e2e_ready("http_sendfile_e2e", &["curl"]) {
        return;
    }
    const CLIENTS: usize = 8;
    let mut env = Env::new("http-gate");
    let config = fs::read_to_string(&env.config).unwrap();
    let gated = config.replacen("[http]\nenabled = true\n", "[http]\nenabled = true\nconcurrent_transfers = 2\n", 1);
    assert_ne!(config, gated, "the base config has an [http] section to extend");
    fs::write(&env.config, gated).unwrap();
    let kernel = random_bytes(5, 8 * 1024 * 1024 + 5);
    let script = random_bytes(6, 4000);
    env.put_file("vmlinuz", &kernel);
    env.put_file("boot.ipxe", &script);
    env.start_server();
    let ns = env.add_client(Some("10.77.0.51/24"), None).ns;
    cap_socket_buffers(&mut env, &ns);
    let dir = env.dir.join("storm");
    fs::create_dir_all(&dir).unwrap();
    let mut shell = String::new();
    for i in 0..CLIENTS {
        let out = s(&dir.join(format!("k{i}")));
        shell += &format!("curl -sS --limit-rate 16M -o {out} {HTTP}/files/vmlinuz & ");
    }
    // A small file is never held behind the large ones.
    shell += &format!("curl -sS -o {} {HTTP}/files/boot.ipxe & wait", s(&dir.join("script")));
    env.run_ok(&ns, &["sh", "-c", &shell], 120);
    for i in 0..CLIENTS {
        assert_eq!(sha(&fs::read(dir.join(format!("k{i}"))).unwrap()), sha(&kernel), "client {i}: bytes differ");
    }
    assert_eq!(fs::read(dir.join("script")).unwrap(), script);
    let admitted = |env: &mut Env, how: &str| env.metric(&format!("fleetboot_http_transfers_admitted_total{{how=\"{how}\"}}"));
    let (at_once, queued, late) = (admitted(&mut env, "at_once"), admitted(&mut env, "queued"), admitted(&mut env, "waited_too_long"));
    let stalled = env.metric("fleetboot_http_transfers_stalled_total");
    eprintln!("storm: admitted at once {at_once}, queued {queued}, late {late}; places given back by a stalled reader {stalled}");
    assert_eq!(at_once + queued + late, CLIENTS as f64, "every large transfer, and only those, went through the gate");
    assert!(queued + late >= 1.0, "eight transfers at once, two places: some waited (at once {at_once}, queued {queued}, late {late})");
    assert!(
        env.eventually(50, |e| e.metric("fleetboot_http_transfers_active") == 0.0 && e.metric("fleetboot_http_transfers_queued") == 0.0),
        "every place given back"
    );
    assert_eq!(env.metric(SENT) as u64, (CLIENTS * kernel.len() + script.len()) as u64, "all by sendfile");
}

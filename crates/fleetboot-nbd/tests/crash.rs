//! Crash safety of private overlays: the server runs in a child process (this test binary
//! re-run as `child_server`), gets SIGKILLed while a client writes, and is restarted. Every
//! write acknowledged before an acknowledged FLUSH must be there; every block must hold
//! either the image's bytes or one complete write (the map never points at garbage); the
//! map journal must replay cleanly.

mod common;

use common::*;
use fleetboot_images::Catalog;
use fleetboot_nbd::{Exports, ExportsConfig, OverlayMode};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const CLIENT: &str = "img@52-54-00-77-00-10";
const BLOCK: usize = 65536;

/// Not a test: the entry point of the server process the crash tests start (this test
/// binary run again with `--ignored --exact child_server`). Ignored, so a test run never
/// counts it, and it refuses to run without the directory its parent passes.
#[test]
#[ignore = "the crash tests' child process, not a test"]
fn child_server() {
    let dir = std::env::var("FLEETBOOT_NBD_CHILD_DIR")
        .expect("child_server is started by the crash tests, which set FLEETBOOT_NBD_CHILD_DIR");
    let catalog = Catalog::open_dir(Path::new(&dir)).unwrap();
    let mut cfg = ExportsConfig::new(&dir);
    cfg.default_mode = OverlayMode::Private;
    let exports = Exports::new(catalog, cfg).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("FLEETBOOT_NBD_PORT={}", l.local_addr().unwrap().port());
        fleetboot_nbd::serve(l, exports, fleetboot_nbd::ServerOptions::new(fleetboot_nbd::Access::open_to_all())).await.unwrap();
    });
}

/// The server process; SIGKILLed when dropped too, so a failing test leaves no orphan.
struct Server(Child);

impl Server {
    fn kill(&mut self) {
        self.0.kill().unwrap(); // SIGKILL
        self.0.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(dir: &Path) -> (Server, std::net::SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_server",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FLEETBOOT_NBD_CHILD_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("child exited").unwrap();
        // libtest may print "test child_server ... " on the same line first.
        if let Some(i) = line.find("FLEETBOOT_NBD_PORT=") {
            break line[i + "FLEETBOOT_NBD_PORT=".len()..]
                .trim()
                .parse::<u16>()
                .unwrap();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server(child), ([127, 0, 0, 1], port).into())
}

fn pattern(i: usize) -> Vec<u8> {
    (0..BLOCK)
        .map(|k| (i as u8).wrapping_mul(17) ^ (k as u8) ^ 0xA5)
        .collect()
}

#[test]
fn sigkill_during_writes_keeps_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = prepare_catalog(dir.path());
    let image = image_bytes();
    let nblocks = IMAGE_SIZE / BLOCK;

    let mut tails = Vec::new();
    for round in 0..3usize {
        let (mut child, addr) = spawn_server(dir.path());
        let mut c = RawClient::connect(addr, CLIENT);
        // Blocks written in this round start at a round-dependent place and wrap around.
        let order: Vec<usize> = (0..nblocks)
            .map(|k| (k * 7 + round * 31) % nblocks)
            .collect();
        let mut written = Vec::new();
        let mut flushed = 0; // written[..flushed] were acknowledged before an acknowledged flush
        for (n, &b) in order.iter().enumerate().take(40 + round * 10) {
            assert_eq!(c.write((b * BLOCK) as u64, &pattern(b + round)), 0);
            written.push(b);
            if n % 8 == 7 {
                assert_eq!(c.flush(), 0);
                flushed = written.len();
            }
        }
        // Unaligned write into an unmapped block: read-modify-write of the rest.
        let tail_block = order[60 + round];
        let tail_off = tail_block * BLOCK + 1000;
        tails.push(tail_block);
        assert_eq!(c.write(tail_off as u64, &[0xEE; 3000]), 0);
        assert_eq!(c.flush(), 0);
        // Then pipeline writes without waiting and kill the server in the middle of them.
        for &b in order.iter().skip(70).take(16) {
            c.send(
                fleetboot_nbd::proto::cmd::WRITE,
                0,
                (b * BLOCK) as u64,
                BLOCK as u32,
                &pattern(b + round),
            );
        }
        child.kill();
        drop(c);

        // The journal replays cleanly (a torn tail at most).
        let v = catalog.resolve("img").unwrap();
        let odir = dir
            .path()
            .join("overlays/private")
            .join(&v.sha256)
            .join("52-54-00-77-00-10");
        let (mapped, _records, _torn) =
            fleetboot_nbd::overlay::inspect_private(&odir, IMAGE_SIZE as u64, BLOCK as u32)
                .unwrap();
        assert!(mapped as usize >= flushed);

        // Restart and read everything back.
        let (mut child, addr) = spawn_server(dir.path());
        let mut c = RawClient::connect(addr, CLIENT);
        let disk = c.read(0, IMAGE_SIZE as u32);
        for &b in &written[..flushed] {
            assert_eq!(
                disk[b * BLOCK..(b + 1) * BLOCK],
                pattern(b + round)[..],
                "round {round}: flushed block {b} lost"
            );
        }
        let mut want_tail = disk[tail_block * BLOCK..(tail_block + 1) * BLOCK].to_vec();
        want_tail[1000..4000].fill(0xEE);
        assert_eq!(
            disk[tail_block * BLOCK..(tail_block + 1) * BLOCK],
            want_tail[..]
        );
        // Every block is the image, or some complete write of an earlier or this round.
        for b in 0..nblocks {
            let got = &disk[b * BLOCK..(b + 1) * BLOCK];
            if tails.contains(&b) {
                continue;
            }
            let ok = got == &image[b * BLOCK..(b + 1) * BLOCK]
                || (0..=round).any(|r| got == &pattern(b + r)[..]);
            assert!(
                ok,
                "round {round}: block {b} holds neither the image nor a complete write"
            );
        }
        // Bytes around the unaligned write came from the image or an earlier complete write.
        let t = &disk[tail_block * BLOCK..(tail_block + 1) * BLOCK];
        let base_t = &image[tail_block * BLOCK..(tail_block + 1) * BLOCK];
        let earlier: Vec<Vec<u8>> = (0..=round).map(|r| pattern(tail_block + r)).collect();
        let around_ok = |src: &[u8]| t[..1000] == src[..1000] && t[4000..] == src[4000..];
        assert!(around_ok(base_t) || earlier.iter().any(|e| around_ok(e)));
        c.disconnect();
        child.kill();
    }
    assert_eq!(
        sha256_file(&catalog.blob_path(&catalog.resolve("img").unwrap().sha256)),
        catalog.resolve("img").unwrap().sha256
    );
}

#[test]
fn qemu_io_flushed_writes_survive_sigkill() {
    if !tools_ready("qemu_io_flushed_writes_survive_sigkill", &["qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let catalog = prepare_catalog(dir.path());
    let (mut child, addr) = spawn_server(dir.path());
    let uri = format!("nbd://{addr}/{CLIENT}");
    let (r, out) = qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 128k",
            "write -P 0x6b 1048577 5000",
            "flush",
            "write -P 0x77 2M 64k",
        ],
    );
    assert_eq!(r, QemuIo::Ok, "{out}");
    child.kill();
    let (mut child, addr) = spawn_server(dir.path());
    let uri = format!("nbd://{addr}/{CLIENT}");
    let (r, out) = qemu_io(&uri, &["read -P 0x5a 0 128k", "read -P 0x6b 1048577 5000"]);
    assert_eq!(r, QemuIo::Ok, "{out}");
    child.kill();
    let v = catalog.resolve("img").unwrap();
    assert_eq!(sha256_file(&catalog.blob_path(&v.sha256)), v.sha256);
}
